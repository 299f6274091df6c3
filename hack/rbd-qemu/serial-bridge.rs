// TCP connections carried over one byte stream (a virtio-serial port), for the RBD guest: it has
// no network (-nic none), yet the tandem processes in it must reach the API server on the host.
// Standard library only, so run.sh builds it with a bare `rustc`.
//
//   serial-bridge guest LISTEN_ADDR SERIAL_DEV   in the guest: accepts on LISTEN_ADDR (127.0.0.1:P)
//   serial-bridge host UNIX_SOCKET TARGET_ADDR   on the host: QEMU's chardev connects to the
//                                                socket; each stream is a connection to TARGET
//
// Frames both ways: connection id (u32 BE), kind (u8: 1 open, 2 data, 3 close), length (u32 BE),
// payload. The guest opens; either side closes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::thread;

const OPEN: u8 = 1;
const DATA: u8 = 2;
const CLOSE: u8 = 3;

type Link = Arc<Mutex<Box<dyn Write + Send>>>;
type Conns = Arc<Mutex<HashMap<u32, TcpStream>>>;

fn send(link: &Link, id: u32, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&id.to_be_bytes());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    let mut out = link.lock().unwrap_or_else(|p| p.into_inner());
    out.write_all(&frame)?;
    out.flush()
}

/// Copies a connection's bytes into frames until it ends, then says so.
fn pump(link: Link, conns: Conns, id: u32, mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if send(&link, id, DATA, &buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    if conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id).is_some() {
        let _ = send(&link, id, CLOSE, &[]);
    }
}

/// Reads frames and hands them to their connections; `open` makes the connection for an OPEN.
fn demux(
    mut input: impl Read,
    link: Link,
    conns: Conns,
    open: impl Fn(u32) -> Option<TcpStream>,
) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    loop {
        input.read_exact(&mut header)?;
        let id = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
        let mut payload = vec![0u8; len];
        input.read_exact(&mut payload)?;
        match header[4] {
            OPEN => match open(id) {
                Some(stream) => {
                    let reader = stream.try_clone()?;
                    conns.lock().unwrap_or_else(|p| p.into_inner()).insert(id, stream);
                    let (link, conns) = (link.clone(), conns.clone());
                    thread::spawn(move || pump(link, conns, id, reader));
                }
                None => send(&link, id, CLOSE, &[])?,
            },
            DATA => {
                let stream = conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .and_then(|s| s.try_clone().ok());
                if let Some(mut stream) = stream {
                    if stream.write_all(&payload).is_err() {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
            }
            CLOSE => {
                if let Some(stream) = conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
            kind => {
                return Err(std::io::Error::other(format!("unknown frame kind {kind}")));
            }
        }
    }
}

fn guest(listen: &str, serial: &str) -> std::io::Result<()> {
    // A virtio-serial port opens once (a second open is EBUSY): one file, two handles.
    let port_in = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(serial)?;
    let port_out = port_in.try_clone()?;
    let link: Link = Arc::new(Mutex::new(Box::new(port_out)));
    let conns: Conns = Arc::default();
    let listener = TcpListener::bind(listen)?;
    {
        let (link, conns) = (link.clone(), conns.clone());
        thread::spawn(move || {
            let result = demux(port_in, link, conns, |_| None);
            eprintln!("serial-bridge: the serial link ended: {result:?}");
            std::process::exit(1);
        });
    }
    let mut next = 0u32;
    for stream in listener.incoming() {
        let stream = stream?;
        let _ = stream.set_nodelay(true);
        next += 1;
        let id = next;
        let reader = stream.try_clone()?;
        conns.lock().unwrap_or_else(|p| p.into_inner()).insert(id, stream);
        send(&link, id, OPEN, &[])?;
        let (link, conns) = (link.clone(), conns.clone());
        thread::spawn(move || pump(link, conns, id, reader));
    }
    Ok(())
}

fn host(socket: &str, target: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    eprintln!("serial-bridge: waiting for QEMU on {socket}");
    let (qemu, _) = listener.accept()?;
    let link: Link = Arc::new(Mutex::new(Box::new(qemu.try_clone()?)));
    let conns: Conns = Arc::default();
    let target = target.to_string();
    let result = demux(qemu, link, conns, move |id| {
        match TcpStream::connect(&target) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                Some(s)
            }
            Err(e) => {
                eprintln!("serial-bridge: connection {id} to {target}: {e}");
                None
            }
        }
    });
    // QEMU closing the socket (the guest powered off) ends the bridge.
    eprintln!("serial-bridge: the serial link ended: {result:?}");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [_, "guest", listen, serial] => guest(listen, serial),
        [_, "host", socket, target] => host(socket, target),
        _ => {
            eprintln!("usage: serial-bridge guest LISTEN_ADDR SERIAL_DEV | host UNIX_SOCKET TARGET_ADDR");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("serial-bridge: {e}");
        std::process::exit(1);
    }
}
