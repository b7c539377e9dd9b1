/*
 * offshoot-agent: the guest agent, installed in the initramfs as /bin/offshoot-agent
 * (scripts/vm-assets.ts compiles it static). /init starts it chrooted in the image's root with the
 * program's environment, before the program, unless the instance was created with
 * skip_guest_agent:
 *
 *   offshoot-agent WORKDIR      serve the virtio-serial port offshoot.agent for the guest's life
 *
 * It runs commands (exec, with pipes or a terminal) and answers stat for the host agent. Its
 * frames are host-agent/guest/agent-protocol.ts; protocol.test.ts holds this file to it.
 *
 * One thread, one ppoll loop over the port and every session's pipes. SIGIO (the host connected)
 * and SIGCHLD (a command ended) stay blocked except inside ppoll, so none is lost between checks.
 * While the host is disconnected the port reports POLLHUP and reads return EOF, so it is left out
 * of the poll then and SIGIO (or a one second timeout) says when to look again. A disconnect is
 * acted on only after LOST_GRACE_MS: the host's first bytes can arrive before virtio_console has
 * processed the port-open message sent with them, and until then the port looks disconnected
 * (reads EOF once the data is read, writes EAGAIN), though the answer must still go out.
 *
 * Memory is bounded: at most MAX_SESSIONS sessions; a session reads its command's output only
 * while the host has granted it credit (OUT_WINDOW to start) and the port's queue has room; the
 * host may send a session at most IN_WINDOW bytes of stdin before this side returns credit.
 * Every session's processes are killed (its process group, SIGKILL) when it ends, when the host
 * asks, and when the host says hello again (a new connection, a restored or forked guest):
 * nothing keeps running that its client cannot see, unless the command left its process group
 * itself (setsid).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "offshoot.agent"
#define HDR 9
#define MAX_PAYLOAD 65536
#define MAX_SESSIONS 64
#define OUT_WINDOW (256 * 1024)
#define IN_WINDOW (64 * 1024)
#define OUTQ_BYTES (1024 * 1024)
#define MAX_ARGS 1024
#define MAX_ENV 1024
#define HELLO_TEXT "offshoot-agent 1 "

/* Frame types, host to guest. */
enum { H_HELLO = 1, H_OPEN = 2, H_STDIN = 3, H_EOF = 4, H_RESIZE = 5, H_CREDIT = 6, H_KILL = 7 };
/* Frame types, guest to host. */
enum { G_HELLO = 1, G_STDOUT = 16, G_STDERR = 17, G_CREDIT = 18, G_EXIT = 19, G_STAT = 20 };

extern char **environ;

struct session {
  int used;
  uint32_t id;
  pid_t pid;
  int tty;
  int in, out, err; /* -1 once closed; with a terminal, in and out are the master */
  int64_t credit;   /* output bytes the host will take */
  unsigned char *inbuf;
  size_t inlen;
  int in_eof;       /* the host ended stdin: close it once inbuf is written */
  int exited, status, timed_out;
  long long deadline; /* ms on CLOCK_MONOTONIC; 0: none */
};

static struct session sessions[MAX_SESSIONS];
static int port = -1, connected = 0;
/* When the host was seen gone (ms); 0: connected, or its sessions already ended. */
static long long lost_at = 0;
#define LOST_GRACE_MS 2000
static unsigned char outq[OUTQ_BYTES];
static size_t outlen = 0;
/* One byte more than a frame: a payload is NUL-terminated in place while it is handled. */
static unsigned char inq[HDR + MAX_PAYLOAD + 1];
static size_t inqlen = 0;
static const char *workdir = "/";

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void put32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24);
  p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8);
  p[3] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p) {
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static size_t room(void) { return OUTQ_BYTES - outlen; }

/* Queues a frame; the caller made sure there is room (control frames are small and always
 * fit: data never fills the queue past OUTQ_BYTES - 64 KiB). */
static void frame(int type, uint32_t id, const void *payload, size_t len) {
  if (room() < HDR + len) return;
  unsigned char *p = outq + outlen;
  p[0] = (unsigned char)type;
  put32(p + 1, id);
  put32(p + 5, (uint32_t)len);
  if (len) memcpy(p + HDR, payload, len);
  outlen += HDR + len;
}

/* Tagged fields: a tag byte, the value, a NUL. */
struct fields {
  char buf[8192];
  size_t len;
};

static void field(struct fields *f, char tag, const char *value) {
  size_t n = strlen(value);
  if (f->len + n + 2 > sizeof f->buf) n = sizeof f->buf - f->len - 2;
  f->buf[f->len++] = tag;
  memcpy(f->buf + f->len, value, n);
  f->len += n;
  f->buf[f->len++] = '\0';
}

static void fieldf(struct fields *f, char tag, const char *fmt, long long v) {
  char s[32];
  snprintf(s, sizeof s, fmt, v);
  field(f, tag, s);
}

static void credit_frame(int type, uint32_t id, uint32_t bytes) {
  unsigned char b[4];
  put32(b, bytes);
  frame(type, id, b, 4);
}

static struct session *find(uint32_t id) {
  for (int i = 0; i < MAX_SESSIONS; i++)
    if (sessions[i].used && sessions[i].id == id) return &sessions[i];
  return NULL;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

/* Ends a session: its process group is killed, its pipes closed. With `report`, the host is told
 * how it ended. */
static void end_session(struct session *s, int report, const char *error) {
  if (s->pid > 0) kill(-s->pid, SIGKILL);
  if (s->tty) {
    if (s->in == s->out) s->in = -1;
  }
  close_fd(&s->in);
  close_fd(&s->out);
  close_fd(&s->err);
  if (report) {
    struct fields f = {.len = 0};
    int code = 127;
    if (error) {
      field(&f, 'e', error);
    } else if (s->timed_out) {
      code = 124;
      field(&f, 't', "1");
    } else if (WIFEXITED(s->status)) {
      code = WEXITSTATUS(s->status);
    } else if (WIFSIGNALED(s->status)) {
      code = 128 + WTERMSIG(s->status);
    }
    fieldf(&f, 'x', "%lld", code);
    frame(G_EXIT, s->id, f.buf, f.len);
  }
  free(s->inbuf);
  memset(s, 0, sizeof *s);
  s->in = s->out = s->err = -1;
}

/* Ends every session and drops what was queued for the host (a new connection, or none). */
static void reset_all(void) {
  for (int i = 0; i < MAX_SESSIONS; i++)
    if (sessions[i].used) end_session(&sessions[i], 0, NULL);
  outlen = 0;
}

/* ---- requests ------------------------------------------------------------------------------ */

struct request {
  const char *op, *cwd, *path;
  char *argv[MAX_ARGS + 1];
  int argc;
  char *env[MAX_ENV + 1];
  int envc;
  int tty, follow;
  unsigned rows, cols;
  long long timeout;
};

/* Parses OPEN's tagged fields in place (the payload is NUL-terminated by its reader). */
static int parse_request(char *p, size_t len, struct request *r) {
  memset(r, 0, sizeof *r);
  r->cwd = workdir;
  char *end = p + len;
  while (p < end) {
    char tag = *p++;
    char *value = p;
    char *nul = memchr(p, '\0', (size_t)(end - p));
    if (!nul) return -1;
    p = nul + 1;
    switch (tag) {
      case 'o': r->op = value; break;
      case 'a':
        if (r->argc == MAX_ARGS) return -1;
        r->argv[r->argc++] = value;
        break;
      case 'e':
        if (r->envc == MAX_ENV || !strchr(value, '=')) return -1;
        r->env[r->envc++] = value;
        break;
      case 'd': if (*value) r->cwd = value; break;
      case 't': r->tty = strcmp(value, "1") == 0; break;
      case 'r': r->rows = (unsigned)strtoul(value, NULL, 10); break;
      case 'c': r->cols = (unsigned)strtoul(value, NULL, 10); break;
      case 'T': r->timeout = strtoll(value, NULL, 10); break;
      case 'p': r->path = value; break;
      case 'f': r->follow = strcmp(value, "1") == 0; break;
      default: break; /* a newer host's field */
    }
  }
  return r->op ? 0 : -1;
}

/* The command's environment: this agent's (the image's, as /init gave it) with the request's
 * variables over it. */
static char **command_env(struct request *r) {
  size_t n = 0;
  while (environ[n]) n++;
  char **out = calloc(n + (size_t)r->envc + 1, sizeof *out);
  if (!out) return NULL;
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    size_t key = strcspn(environ[i], "=");
    int overridden = 0;
    for (int j = 0; j < r->envc && !overridden; j++)
      overridden = strncmp(r->env[j], environ[i], key + 1) == 0;
    if (!overridden) out[k++] = environ[i];
  }
  for (int j = 0; j < r->envc; j++) out[k++] = r->env[j];
  out[k] = NULL;
  return out;
}

static void set_winsize(int fd, unsigned rows, unsigned cols) {
  if (!rows || !cols) return;
  struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
  ioctl(fd, TIOCSWINSZ, &ws);
}

/* In the child: reports `what` failing (errno) on the error pipe and exits. */
static void child_fail(int errfd, const char *what) {
  char msg[512];
  int n = snprintf(msg, sizeof msg, "%s: %s", what, strerror(errno));
  if (write(errfd, msg, (size_t)n) < 0) _exit(127);
  _exit(127);
}

static int nonblock(int fd) { return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* Starts the command; on failure fills `error` and returns -1. */
static int spawn(struct session *s, struct request *r, char *error, size_t errlen) {
  if (r->argc == 0) {
    snprintf(error, errlen, "no command");
    return -1;
  }
  r->argv[r->argc] = NULL;
  int report[2] = {-1, -1}, in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, master = -1;
  char *slave = NULL;
  if (pipe2(report, O_CLOEXEC) < 0) goto sys;
  if (r->tty) {
    master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 || !(slave = ptsname(master)))
      goto sys;
    slave = strdup(slave);
    set_winsize(master, r->rows, r->cols);
  } else if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
    goto sys;
  }
  char **envp = command_env(r);
  if (!envp) goto sys;
  pid_t pid = fork();
  if (pid < 0) {
    free(envp);
    goto sys;
  }
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGIO, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    setsid();
    if (r->tty) {
      int fd = open(slave, O_RDWR);
      if (fd < 0) child_fail(report[1], "open terminal");
      ioctl(fd, TIOCSCTTY, 0);
      dup2(fd, 0);
      dup2(fd, 1);
      dup2(fd, 2);
      if (fd > 2) close(fd);
    } else {
      dup2(in[0], 0);
      dup2(out[1], 1);
      dup2(err[1], 2);
    }
    if (chdir(r->cwd) < 0) child_fail(report[1], r->cwd);
    environ = envp;
    execvp(r->argv[0], r->argv);
    child_fail(report[1], r->argv[0]);
  }
  free(envp);
  free(slave);
  slave = NULL;
  close_fd(&report[1]);
  /* The child closes it by exec (CLOEXEC) or writes why it could not. */
  ssize_t n;
  do n = read(report[0], error, errlen - 1);
  while (n < 0 && errno == EINTR);
  close_fd(&report[0]);
  if (n > 0) {
    error[n] = '\0';
    waitpid(pid, NULL, 0);
    goto fail;
  }
  s->pid = pid;
  s->tty = r->tty;
  if (r->tty) {
    nonblock(master);
    s->in = s->out = master;
    s->err = -1;
  } else {
    close(in[0]);
    close(out[1]);
    close(err[1]);
    s->in = in[1];
    s->out = out[0];
    s->err = err[0];
    nonblock(s->in);
    nonblock(s->out);
    nonblock(s->err);
  }
  s->deadline = r->timeout > 0 ? now_ms() + r->timeout * 1000 : 0;
  return 0;
sys:
  snprintf(error, errlen, "cannot start the command: %s", strerror(errno));
fail:
  free(slave);
  close_fd(&master);
  for (int i = 0; i < 2; i++) {
    close_fd(&report[i]);
    close_fd(&in[i]);
    close_fd(&out[i]);
    close_fd(&err[i]);
  }
  return -1;
}

static void do_stat(uint32_t id, struct request *r) {
  struct fields f = {.len = 0};
  struct stat st;
  if (!r->path || !*r->path) {
    field(&f, 'E', "0");
    field(&f, 'x', "no path");
  } else if ((r->follow ? stat(r->path, &st) : lstat(r->path, &st)) < 0) {
    field(&f, 'E', "0");
    if (errno != ENOENT && errno != ENOTDIR) field(&f, 'x', strerror(errno));
  } else {
    field(&f, 'E', "1");
    field(&f, 'k', S_ISDIR(st.st_mode) ? "d" : S_ISREG(st.st_mode) ? "f" : S_ISLNK(st.st_mode) ? "l" : "o");
    fieldf(&f, 'm', "%lld", (long long)(st.st_mode & 07777));
    fieldf(&f, 's', "%lld", (long long)st.st_size);
    if (S_ISLNK(st.st_mode)) {
      char target[4096];
      ssize_t n = readlink(r->path, target, sizeof target - 1);
      if (n >= 0) {
        target[n] = '\0';
        field(&f, 'l', target);
      }
    }
  }
  frame(G_STAT, id, f.buf, f.len);
}

static void open_session(uint32_t id, char *payload, size_t len) {
  struct request r;
  struct session *s = NULL;
  if (find(id)) return; /* a duplicate id: the host's mistake, ignored */
  if (parse_request(payload, len, &r) < 0) {
    struct fields f = {.len = 0};
    field(&f, 'e', "malformed request");
    fieldf(&f, 'x', "%lld", 127);
    frame(G_EXIT, id, f.buf, f.len);
    return;
  }
  if (strcmp(r.op, "stat") == 0) {
    do_stat(id, &r);
    return;
  }
  for (int i = 0; i < MAX_SESSIONS && !s; i++)
    if (!sessions[i].used) s = &sessions[i];
  char error[512] = "";
  if (strcmp(r.op, "exec") != 0) {
    snprintf(error, sizeof error, "unknown operation %s", r.op);
  } else if (!s) {
    snprintf(error, sizeof error, "too many sessions (at most %d)", MAX_SESSIONS);
  } else {
    memset(s, 0, sizeof *s);
    s->in = s->out = s->err = -1;
    s->used = 1;
    s->id = id;
    s->credit = OUT_WINDOW;
    s->inbuf = malloc(IN_WINDOW);
    if (!s->inbuf) snprintf(error, sizeof error, "out of memory");
    else if (spawn(s, &r, error, sizeof error) == 0) return;
  }
  if (s && s->used) {
    end_session(s, 1, error);
  } else {
    struct fields f = {.len = 0};
    field(&f, 'e', error);
    fieldf(&f, 'x', "%lld", 127);
    frame(G_EXIT, id, f.buf, f.len);
  }
}

/* Writes what stdin holds; returns credit to the host for what was written. */
static void pump_stdin(struct session *s) {
  if (s->in < 0) return;
  size_t done = 0;
  while (done < s->inlen) {
    ssize_t n = write(s->in, s->inbuf + done, s->inlen - done);
    if (n > 0) {
      done += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    /* The command closed its stdin: what is left is dropped (credit still returned). */
    done = s->inlen;
    if (!s->tty) close_fd(&s->in);
  }
  if (done) {
    memmove(s->inbuf, s->inbuf + done, s->inlen - done);
    s->inlen -= done;
    credit_frame(G_CREDIT, s->id, (uint32_t)done);
  }
  if (s->in_eof && s->inlen == 0 && !s->tty) close_fd(&s->in);
}

static void handle_frame(int type, uint32_t id, unsigned char *p, size_t len) {
  struct session *s = id ? find(id) : NULL;
  switch (type) {
    case H_HELLO: {
      reset_all();
      unsigned char reply[HDR + 64 + sizeof HELLO_TEXT];
      size_t n = sizeof HELLO_TEXT - 1;
      memcpy(reply, HELLO_TEXT, n);
      if (len > 64) len = 64;
      memcpy(reply + n, p, len);
      frame(G_HELLO, 0, reply, n + len);
      return;
    }
    case H_OPEN:
      p[len] = '\0';
      open_session(id, (char *)p, len);
      return;
    case H_STDIN:
      if (!s) return;
      if (s->inlen + len > IN_WINDOW) {
        end_session(s, 1, "stdin beyond the credit given");
        return;
      }
      memcpy(s->inbuf + s->inlen, p, len);
      s->inlen += len;
      pump_stdin(s);
      return;
    case H_EOF:
      if (!s) return;
      s->in_eof = 1;
      if (s->tty && s->in >= 0 && s->inlen + 1 <= IN_WINDOW) {
        /* A terminal has no end of input but ^D at the start of a line. */
        s->inbuf[s->inlen++] = 4;
      }
      pump_stdin(s);
      return;
    case H_RESIZE:
      if (s && s->tty && len == 4 && s->out >= 0)
        set_winsize(s->out, ((unsigned)p[0] << 8) | p[1], ((unsigned)p[2] << 8) | p[3]);
      return;
    case H_CREDIT:
      if (s && len == 4) s->credit += get32(p);
      return;
    case H_KILL:
      if (s) end_session(s, 0, NULL);
      return;
    default:
      return;
  }
}

/* ---- the port ------------------------------------------------------------------------------ */

static int find_port(char *dev, size_t len) {
  DIR *d = opendir("/sys/class/virtio-ports");
  if (!d) return -1;
  struct dirent *e;
  int found = -1;
  while (found < 0 && (e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    char path[300], name[64];
    snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    ssize_t n = read(fd, name, sizeof name - 1);
    close(fd);
    if (n <= 0) continue;
    name[n] = '\0';
    name[strcspn(name, "\n")] = '\0';
    if (strcmp(name, PORT_NAME) == 0) {
      snprintf(dev, len, "/dev/%s", e->d_name);
      found = 0;
    }
  }
  closedir(d);
  return found;
}

static int open_port(void) {
  char dev[300];
  for (int tries = 0; tries < 100; tries++) {
    if (find_port(dev, sizeof dev) == 0) {
      int fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC);
      if (fd >= 0) {
        if (fcntl(fd, F_SETOWN, getpid()) == 0 &&
            fcntl(fd, F_SETFL, O_RDWR | O_NONBLOCK | O_ASYNC) == 0)
          return fd;
        close(fd);
      }
    }
    usleep(100 * 1000);
  }
  return -1;
}

/* Reads what the port has and handles every whole frame. A frame longer than MAX_PAYLOAD means
 * the stream lost its framing: everything is reset until the host says hello again. */
static void read_port(void) {
  for (;;) {
    ssize_t n = read(port, inq + inqlen, sizeof inq - 1 - inqlen);
    if (n == 0) {
      if (connected) lost_at = now_ms();
      connected = 0;
      return;
    }
    if (n < 0) {
      if (errno == EAGAIN) {
        connected = 1;
        lost_at = 0;
      }
      return;
    }
    connected = 1;
    lost_at = 0;
    inqlen += (size_t)n;
    size_t off = 0;
    while (inqlen - off >= HDR) {
      uint32_t len = get32(inq + off + 5);
      if (len > MAX_PAYLOAD) {
        reset_all();
        inqlen = 0;
        return;
      }
      if (inqlen - off < HDR + len) break;
      /* The byte after the payload (the next frame's, or spare) is saved and restored. */
      unsigned char *p = inq + off + HDR, saved = p[len];
      handle_frame(inq[off], get32(inq + off + 1), p, len);
      p[len] = saved;
      off += HDR + len;
    }
    memmove(inq, inq + off, inqlen - off);
    inqlen -= off;
  }
}

static void flush_port(void) {
  size_t off = 0;
  while (off < outlen) {
    ssize_t n = write(port, outq + off, outlen - off);
    if (n > 0) off += (size_t)n;
    else if (n < 0 && errno == EINTR) continue;
    else break;
  }
  memmove(outq, outq + off, outlen - off);
  outlen -= off;
}

/* Reads a session's output while it has credit and the queue has room; returns whether any
 * was read. */
static int pump_output(struct session *s, int *fd, int type) {
  int got = 0;
  while (*fd >= 0 && s->credit > 0 && room() >= HDR + MAX_PAYLOAD + 4096) {
    static unsigned char buf[MAX_PAYLOAD];
    size_t want = s->credit < MAX_PAYLOAD ? (size_t)s->credit : MAX_PAYLOAD;
    ssize_t n = read(*fd, buf, want);
    if (n > 0) {
      frame(type, s->id, buf, (size_t)n);
      s->credit -= n;
      got = 1;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    /* EOF, or EIO from a terminal whose last holder closed it. */
    if (s->tty && *fd == s->in) s->in = -1;
    close_fd(fd);
  }
  return got;
}

static void reap(void) {
  int status;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    for (int i = 0; i < MAX_SESSIONS; i++) {
      struct session *s = &sessions[i];
      if (s->used && s->pid == pid && !s->exited) {
        s->exited = 1;
        s->status = status;
      }
    }
  }
}

static void on_signal(int sig) { (void)sig; }

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: offshoot-agent WORKDIR\n");
    return 2;
  }
  if (*argv[1]) workdir = argv[1];
  for (int i = 0; i < MAX_SESSIONS; i++) sessions[i].in = sessions[i].out = sessions[i].err = -1;
  sigset_t blocked, waiting;
  sigemptyset(&blocked);
  sigaddset(&blocked, SIGIO);
  sigaddset(&blocked, SIGCHLD);
  sigprocmask(SIG_BLOCK, &blocked, &waiting);
  sigdelset(&waiting, SIGIO);
  sigdelset(&waiting, SIGCHLD);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGIO, &sa, NULL);
  sigaction(SIGCHLD, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  port = open_port();
  if (port < 0) {
    fprintf(stderr, "offshoot-agent: no port %s\n", PORT_NAME);
    return 1;
  }
  for (;;) {
    read_port();
    reap();
    long long now = now_ms(), wait = 1000;
    struct pollfd fds[1 + 3 * MAX_SESSIONS];
    int nfds = 0;
    for (int i = 0; i < MAX_SESSIONS; i++) {
      struct session *s = &sessions[i];
      if (!s->used) continue;
      pump_stdin(s);
      int got = pump_output(s, &s->out, G_STDOUT);
      got |= pump_output(s, &s->err, G_STDERR);
      if (s->deadline && !s->exited && now >= s->deadline) {
        kill(-s->pid, SIGKILL);
        s->timed_out = 1;
        s->deadline = 0;
      }
      /* Ended: once its output is drained (nothing more readable now), or with no credit left
       * to drain it, it waits for the host. */
      if (s->exited && !got && s->credit > 0 && room() >= 4096) {
        int readable = 0;
        struct pollfd p[2] = {{.fd = s->out, .events = POLLIN}, {.fd = s->err, .events = POLLIN}};
        if (poll(p, 2, 0) > 0)
          readable = (p[0].revents & (POLLIN | POLLHUP)) || (p[1].revents & (POLLIN | POLLHUP));
        if (!readable || (s->out < 0 && s->err < 0)) {
          end_session(s, 1, NULL);
          continue;
        }
      }
      if (s->deadline) {
        long long left = s->deadline - now;
        if (left < wait) wait = left < 0 ? 0 : left;
      }
      int can_read = s->credit > 0 && room() >= HDR + MAX_PAYLOAD + 4096;
      if (s->out >= 0 && can_read) {
        fds[nfds] = (struct pollfd){.fd = s->out, .events = POLLIN};
        nfds++;
      }
      if (s->err >= 0 && can_read) {
        fds[nfds] = (struct pollfd){.fd = s->err, .events = POLLIN};
        nfds++;
      }
      if (s->in >= 0 && s->inlen > 0 && !s->tty) {
        fds[nfds] = (struct pollfd){.fd = s->in, .events = POLLOUT};
        nfds++;
      }
    }
    if (!connected && lost_at && now - lost_at >= LOST_GRACE_MS) {
      reset_all();
      inqlen = 0;
      lost_at = 0;
    }
    /* Tried while the port looks disconnected too: it may only be the port-open message late. */
    if (outlen) flush_port();
    if (connected) {
      fds[nfds] = (struct pollfd){.fd = port, .events = POLLIN | (outlen ? POLLOUT : 0)};
      nfds++;
    }
    if ((outlen || lost_at) && wait > 100) wait = 100;
    struct timespec ts = {.tv_sec = wait / 1000, .tv_nsec = (wait % 1000) * 1000000L};
    int r = ppoll(fds, (nfds_t)nfds, &ts, &waiting);
    if (r > 0 && connected && (fds[nfds - 1].revents & POLLHUP)) {
      connected = 0;
      lost_at = now_ms();
    }
  }
}
