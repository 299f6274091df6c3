/* The pod sandbox's pause process (kubelet's "infra" container), built here so the node needs no
 * registry: waits for a signal, reaps zombies. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
  struct sigaction sa = {0};
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  sa.sa_handler = reap;
  sa.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &sa, 0);
  for (;;) pause();
}
