/* cephcmd: sends mon commands through librados, one connection for all of them. The guest has no
 * Python, so no `ceph` CLI; this stands in for the few `ceph ...` calls the bring-up needs.
 *   cephcmd JSON...      e.g. cephcmd '{"prefix":"osd pool create","pool":"rbd","pg_num":8}'
 * Runs the commands in order and stops at the first that fails. Prints each command's output
 * buffer on stdout and its status string on stderr. Exit: 0, or errno of the failed command.
 * Env: CEPH_CONF (required), CEPHCMD_TIMEOUT in seconds (default 30). Under TCG a process start
 * plus connect costs about 1 s, so batch the commands into one call.
 * Built by run.sh: gcc -O2 -o cephcmd cephcmd.c -lrados   (librados-dev) */
#include <rados/librados.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: cephcmd JSON...\n"); return 2; }
  rados_t c;
  int r = rados_create(&c, "admin");
  if (r == 0) r = rados_conf_read_file(c, getenv("CEPH_CONF"));
  const char *to = getenv("CEPHCMD_TIMEOUT");
  if (!to) to = "30";
  if (r == 0) r = rados_conf_set(c, "client_mount_timeout", to);
  if (r == 0) r = rados_conf_set(c, "rados_mon_op_timeout", to);
  if (r == 0) r = rados_connect(c);
  if (r < 0) { fprintf(stderr, "cephcmd: connect: %s\n", strerror(-r)); return 1; }
  for (int i = 1; i < argc; i++) {
    const char *cmd[1] = { argv[i] };
    char *out = NULL, *outs = NULL; size_t outlen = 0, outslen = 0;
    r = rados_mon_command(c, cmd, 1, "", 0, &out, &outlen, &outs, &outslen);
    if (outlen) { fwrite(out, 1, outlen, stdout); if (out[outlen - 1] != '\n') putchar('\n'); }
    if (outslen) fprintf(stderr, "%.*s\n", (int)outslen, outs);
    rados_buffer_free(out); rados_buffer_free(outs);
    if (r < 0) { fprintf(stderr, "cephcmd: %s: %s\n", argv[i], strerror(-r)); break; }
  }
  rados_shutdown(c);
  return r < 0 ? (-r > 255 ? 1 : -r) : 0;
}
