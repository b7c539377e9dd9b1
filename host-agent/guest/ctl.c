/*
 * offshoot-ctl: the guest's side of the control channel, installed in the initramfs as
 * /bin/offshoot-ctl (scripts/vm-assets.ts compiles it static). Its commands and replies are
 * host-agent/guest/protocol.ts; protocol.test.ts holds this file to it.
 *
 *   offshoot-ctl serve           answer the virtio-serial port offshoot.ctl for the guest's life
 *   offshoot-ctl net [ADDR [GW]] boot-time network: lo up; with ADDR (e.g. 10.64.0.5/20) eth0
 *                                gets it and comes up, with GW the default route goes via it
 *   offshoot-ctl do COMMAND…     answer one command (its words joined by spaces) on stdout
 *   offshoot-ctl as USER PROG…   exec PROG as the image's User ("name", "uid", "name:group",
 *                                "uid:gid"; names from this root's /etc/passwd and /etc/group)
 *
 * Serving: the port is opened non-blocking with O_ASYNC, so virtio_console sends this process
 * SIGIO when the host connects and when data arrives. SIGIO stays blocked and is taken with
 * sigtimedwait (a signal raised between a read and the wait stays pending, so none is lost); a
 * one second timeout re-reads anyway in case one was never sent. While the host is disconnected
 * a read returns EOF at once, which is why the port is not polled with poll(2) (it reports
 * POLLHUP continuously then).
 *
 * Every step is a syscall, an ioctl or a netlink request: no exec, which costs a lot under TCG.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <netpacket/packet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
/* Kernel headers that do not clash with libc's net/if.h (linux/if.h does). */
#include <linux/neighbour.h>
#include <linux/netlink.h>
#include <linux/random.h>
#include <linux/rtnetlink.h>

#define PORT_NAME "offshoot.ctl"
#define IFNAME "eth0"
/* The longest command line taken, without its newline; longer ones get an err reply. */
#define MAX_LINE 512
/* A reply line, without its newline. */
#define MAX_REPLY 600
#define MAX_ARGS 8
#define PROGRAM_PID "/run/offshoot/program.pid"
#define MACHINE_ID "/newroot/etc/machine-id"
#define MACHINE_ID_TMP "/newroot/etc/.machine-id.offshoot"
#define SEED_BYTES 32
/* What `query rng` draws from the kernel CRNG. */
#define RNG_BYTES 32
#define MACHINE_ID_CHARS 32

/* ---------------------------------------------------------------------------------------- */
/* Replies */

/* The reply being built: one line, truncated (never overrun) if a reason is too long. */
static char reply[MAX_REPLY + 1];

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(reply, sizeof reply, fmt, ap);
  va_end(ap);
  /* A reply is one line whatever a reason holds. */
  for (char *p = reply; *p; p++)
    if (*p == '\n' || *p == '\r') *p = ' ';
}

/* Replies `...` and returns from the (void) command. */
#define FAIL(...)      \
  do {                 \
    say(__VA_ARGS__);  \
    return;            \
  } while (0)

/* ---------------------------------------------------------------------------------------- */
/* Parsing */

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Exactly 2*n hex digits into n bytes; lower: only lowercase digits accepted. */
static int parse_hex(const char *s, unsigned char *out, size_t n, int lower) {
  if (strlen(s) != 2 * n) return -1;
  for (size_t i = 0; i < n; i++) {
    int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return -1;
    if (lower && (isupper((unsigned char)s[2 * i]) || isupper((unsigned char)s[2 * i + 1])))
      return -1;
    out[i] = (unsigned char)(hi << 4 | lo);
  }
  return 0;
}

/* aa:bb:cc:dd:ee:ff, a unicast address that is not all zeros. */
static int parse_mac(const char *s, unsigned char mac[6]) {
  if (strlen(s) != 17) return -1;
  for (int i = 0; i < 6; i++) {
    int hi = hexval(s[3 * i]), lo = hexval(s[3 * i + 1]);
    if (hi < 0 || lo < 0 || (i < 5 && s[3 * i + 2] != ':')) return -1;
    mac[i] = (unsigned char)(hi << 4 | lo);
  }
  static const unsigned char zero[6];
  return (mac[0] & 1) || memcmp(mac, zero, 6) == 0 ? -1 : 0;
}

static void format_mac(const unsigned char mac[6], char out[18]) {
  snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4],
           mac[5]);
}

/* a.b.c.d */
static int parse_ip(const char *s, struct in_addr *ip) {
  return inet_pton(AF_INET, s, ip) == 1 ? 0 : -1;
}

/* a.b.c.d/p with p in 0..32 (the prefix is required). */
static int parse_cidr(const char *s, struct in_addr *ip, int *prefix) {
  const char *slash = strchr(s, '/');
  if (!slash || slash == s || slash - s > INET_ADDRSTRLEN - 1) return -1;
  char host[INET_ADDRSTRLEN];
  memcpy(host, s, (size_t)(slash - s));
  host[slash - s] = '\0';
  const char *p = slash + 1;
  if (!*p || strlen(p) > 2) return -1;
  int n = 0;
  for (; *p; p++) {
    if (!isdigit((unsigned char)*p)) return -1;
    n = n * 10 + (*p - '0');
  }
  if (n > 32 || parse_ip(host, ip) < 0) return -1;
  *prefix = n;
  return 0;
}

/* A hostname: 1 to 63 letters, digits, '-' and '.'. */
static int valid_hostname(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > 63) return 0;
  for (; *s; s++)
    if (!isalnum((unsigned char)*s) && *s != '-' && *s != '.') return 0;
  return 1;
}

static uint32_t prefix_mask(int prefix) {
  return prefix == 0 ? 0 : htonl(0xffffffffu << (32 - prefix));
}

/* ---------------------------------------------------------------------------------------- */
/* eth0 through ioctls */

/* An AF_INET datagram socket, the handle for the interface ioctls. */
static int ioctl_sock(void) { return socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0); }

static void ifr_init(struct ifreq *ifr, const char *name) {
  memset(ifr, 0, sizeof *ifr);
  snprintf(ifr->ifr_name, sizeof ifr->ifr_name, "%s", name);
}

static int get_mac(int s, unsigned char mac[6]) {
  struct ifreq ifr;
  ifr_init(&ifr, IFNAME);
  if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0) return -1;
  memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
  return 0;
}

static int get_flags(int s, const char *name, short *flags) {
  struct ifreq ifr;
  ifr_init(&ifr, name);
  if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) return -1;
  *flags = ifr.ifr_flags;
  return 0;
}

static int set_up(int s, const char *name, int up) {
  short flags;
  if (get_flags(s, name, &flags) < 0) return -1;
  short want = up ? (short)(flags | IFF_UP) : (short)(flags & ~IFF_UP);
  if (want == flags) return 0;
  struct ifreq ifr;
  ifr_init(&ifr, name);
  ifr.ifr_flags = want;
  return ioctl(s, SIOCSIFFLAGS, &ifr);
}

/* Sets eth0's MAC, taking the link down for it if it is up (and up again). A link going down
 * flushes its neighbour entries and its routes. *changed: whether it differed. */
static int set_mac(int s, const unsigned char mac[6], int *changed, const char **step) {
  unsigned char cur[6];
  *changed = 0;
  *step = "mac read";
  if (get_mac(s, cur) < 0) return -1;
  if (memcmp(cur, mac, 6) == 0) return 0;
  *changed = 1;
  short flags;
  *step = "link";
  if (get_flags(s, IFNAME, &flags) < 0) return -1;
  if ((flags & IFF_UP) && set_up(s, IFNAME, 0) < 0) return -1;
  struct ifreq ifr;
  ifr_init(&ifr, IFNAME);
  ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
  memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
  *step = "mac";
  int r = ioctl(s, SIOCSIFHWADDR, &ifr);
  int saved = errno;
  if ((flags & IFF_UP) && set_up(s, IFNAME, 1) < 0 && r == 0) {
    *step = "link up";
    return -1;
  }
  errno = saved;
  return r;
}

/* eth0's primary IPv4 address and prefix length; -1 with EADDRNOTAVAIL when it has none. */
static int get_addr(int s, struct in_addr *ip, int *prefix) {
  struct ifreq ifr;
  ifr_init(&ifr, IFNAME);
  if (ioctl(s, SIOCGIFADDR, &ifr) < 0) return -1;
  *ip = ((struct sockaddr_in *)(void *)&ifr.ifr_addr)->sin_addr;
  ifr_init(&ifr, IFNAME);
  if (ioctl(s, SIOCGIFNETMASK, &ifr) < 0) return -1;
  *prefix = __builtin_popcount(((struct sockaddr_in *)(void *)&ifr.ifr_netmask)->sin_addr.s_addr);
  return 0;
}

/* "a.b.c.d/p", or "-" when eth0 has no address. */
static void format_addr(int s, char *out, size_t len) {
  struct in_addr ip;
  int prefix;
  char host[INET_ADDRSTRLEN];
  if (get_addr(s, &ip, &prefix) < 0 || !inet_ntop(AF_INET, &ip, host, sizeof host))
    snprintf(out, len, "-");
  else
    snprintf(out, len, "%s/%d", host, prefix);
}

/* ---------------------------------------------------------------------------------------- */
/* rtnetlink */

/* A request: header, family header and room for a few attributes. */
struct nlreq {
  struct nlmsghdr h;
  union {
    struct ifaddrmsg addr;
    struct rtmsg route;
    struct ndmsg neigh;
  } u;
  char attrs[128];
};

static unsigned nl_seq;

static int nl_open(void) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (fd < 0) return -1;
  /* A reply never takes long, but a lost one must not hang the channel. */
  struct timeval tv = {.tv_sec = 2};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

static void nl_init(struct nlreq *req, int type, int flags, size_t family_len) {
  memset(req, 0, sizeof *req);
  req->h.nlmsg_len = (unsigned)NLMSG_LENGTH(family_len);
  req->h.nlmsg_type = (unsigned short)type;
  req->h.nlmsg_flags = (unsigned short)(NLM_F_REQUEST | flags);
  req->h.nlmsg_seq = ++nl_seq;
}

static void nl_attr(struct nlreq *req, int type, const void *data, size_t len) {
  size_t at = NLMSG_ALIGN(req->h.nlmsg_len);
  /* The requests here are fixed and small; this only guards a future edit. */
  if (at + RTA_SPACE(len) > sizeof *req) abort();
  struct rtattr *rta = (struct rtattr *)(void *)((char *)req + at);
  rta->rta_type = (unsigned short)type;
  rta->rta_len = (unsigned short)RTA_LENGTH(len);
  memcpy(RTA_DATA(rta), data, len);
  req->h.nlmsg_len = (unsigned)(at + RTA_SPACE(len));
}

static union {
  char bytes[16384];
  struct nlmsghdr align;
} nl_buf;

/* Sends a request; with a callback, a dump: calls it for each message until NLMSG_DONE.
 * Without one, waits for the kernel's ack. 0, or -1 with errno set. */
static int nl_talk(int fd, struct nlreq *req, void (*each)(struct nlmsghdr *, void *), void *arg) {
  if (!each) req->h.nlmsg_flags |= NLM_F_ACK;
  struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
  if (sendto(fd, req, req->h.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0)
    return -1;
  for (;;) {
    ssize_t n = recv(fd, nl_buf.bytes, sizeof nl_buf.bytes, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    size_t left = (size_t)n;
    for (struct nlmsghdr *h = &nl_buf.align; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
      if (h->nlmsg_seq != req->h.nlmsg_seq) continue; /* a stale reply */
      if (h->nlmsg_type == NLMSG_DONE) return 0;
      if (h->nlmsg_type == NLMSG_ERROR) {
        const struct nlmsgerr *e = NLMSG_DATA(h);
        if (e->error == 0) return 0;
        errno = -e->error;
        return -1;
      }
      if (each) each(h, arg);
    }
  }
}

/* Removes every IPv4 address of interface `index`: each RTM_DELADDR without an address
 * attribute deletes the first one. */
static int flush_addrs(int fd, int index) {
  for (int i = 0; i < 256; i++) {
    struct nlreq req;
    nl_init(&req, RTM_DELADDR, 0, sizeof req.u.addr);
    req.u.addr.ifa_family = AF_INET;
    req.u.addr.ifa_index = (unsigned)index;
    if (nl_talk(fd, &req, NULL, NULL) < 0)
      return errno == EADDRNOTAVAIL || errno == ENODEV ? 0 : -1;
  }
  errno = EBUSY;
  return -1;
}

static int add_addr(int fd, int index, struct in_addr ip, int prefix) {
  struct nlreq req;
  nl_init(&req, RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, sizeof req.u.addr);
  req.u.addr.ifa_family = AF_INET;
  req.u.addr.ifa_prefixlen = (unsigned char)prefix;
  req.u.addr.ifa_scope = RT_SCOPE_UNIVERSE;
  req.u.addr.ifa_index = (unsigned)index;
  nl_attr(&req, IFA_LOCAL, &ip, sizeof ip);
  nl_attr(&req, IFA_ADDRESS, &ip, sizeof ip);
  if (prefix < 31) {
    struct in_addr brd = {.s_addr = ip.s_addr | ~prefix_mask(prefix)};
    nl_attr(&req, IFA_BROADCAST, &brd, sizeof brd);
  }
  return nl_talk(fd, &req, NULL, NULL);
}

/* The main table's default route: via `gw` on interface `index`, or (gw NULL) none. */
static int set_default_route(int fd, int index, const struct in_addr *gw) {
  struct nlreq req;
  nl_init(&req, gw ? RTM_NEWROUTE : RTM_DELROUTE, gw ? NLM_F_CREATE | NLM_F_REPLACE : 0,
          sizeof req.u.route);
  req.u.route.rtm_family = AF_INET;
  req.u.route.rtm_table = RT_TABLE_MAIN;
  if (gw) {
    req.u.route.rtm_protocol = RTPROT_BOOT;
    req.u.route.rtm_scope = RT_SCOPE_UNIVERSE;
    req.u.route.rtm_type = RTN_UNICAST;
    nl_attr(&req, RTA_GATEWAY, gw, sizeof *gw);
    nl_attr(&req, RTA_OIF, &index, sizeof index);
    return nl_talk(fd, &req, NULL, NULL);
  }
  req.u.route.rtm_scope = RT_SCOPE_NOWHERE;
  /* Delete until there is none left; ESRCH: there was none. */
  for (int i = 0; i < 16; i++) {
    nl_init(&req, RTM_DELROUTE, 0, sizeof req.u.route);
    req.u.route.rtm_family = AF_INET;
    req.u.route.rtm_table = RT_TABLE_MAIN;
    req.u.route.rtm_scope = RT_SCOPE_NOWHERE;
    if (nl_talk(fd, &req, NULL, NULL) < 0) return errno == ESRCH ? 0 : -1;
  }
  return 0;
}

/* The gateway of the main table's IPv4 default route, if any. */
struct gw_found {
  int found;
  struct in_addr gw;
};

static void each_route(struct nlmsghdr *h, void *arg) {
  struct gw_found *out = arg;
  if (out->found || h->nlmsg_type != RTM_NEWROUTE) return;
  const struct rtmsg *rt = NLMSG_DATA(h);
  if (rt->rtm_family != AF_INET || rt->rtm_dst_len != 0 || rt->rtm_type != RTN_UNICAST) return;
  unsigned table = rt->rtm_table;
  struct in_addr gw = {0};
  int have_gw = 0;
  int len = (int)RTM_PAYLOAD(h);
  for (struct rtattr *a = RTM_RTA(rt); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    if (a->rta_type == RTA_TABLE && RTA_PAYLOAD(a) >= 4) memcpy(&table, RTA_DATA(a), 4);
    if (a->rta_type == RTA_GATEWAY && RTA_PAYLOAD(a) >= 4) {
      memcpy(&gw, RTA_DATA(a), 4);
      have_gw = 1;
    }
  }
  if (table == RT_TABLE_MAIN && have_gw) {
    out->found = 1;
    out->gw = gw;
  }
}

static int get_gateway(int fd, struct in_addr *gw) {
  struct nlreq req;
  nl_init(&req, RTM_GETROUTE, NLM_F_DUMP, sizeof req.u.route);
  req.u.route.rtm_family = AF_INET;
  struct gw_found out = {0};
  if (nl_talk(fd, &req, each_route, &out) < 0) return -1;
  if (!out.found) {
    errno = ESRCH;
    return -1;
  }
  *gw = out.gw;
  return 0;
}

/* Neighbour entries to delete, collected by a dump first (not deleted while it runs). */
#define MAX_NEIGH 64
struct neigh_list {
  int index;
  int n;
  struct {
    unsigned char family;
    unsigned char len;
    unsigned char addr[16];
  } e[MAX_NEIGH];
};

static void each_neigh(struct nlmsghdr *h, void *arg) {
  struct neigh_list *list = arg;
  if (h->nlmsg_type != RTM_NEWNEIGH || list->n >= MAX_NEIGH) return;
  const struct ndmsg *nd = NLMSG_DATA(h);
  /* Like `ip neigh flush`: permanent and no-ARP entries stay. */
  if (nd->ndm_ifindex != list->index || (nd->ndm_state & (NUD_PERMANENT | NUD_NOARP))) return;
  int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *nd));
  for (struct rtattr *a = (struct rtattr *)(void *)((char *)nd + NLMSG_ALIGN(sizeof *nd));
       RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    if (a->rta_type != NDA_DST || RTA_PAYLOAD(a) > 16) continue;
    list->e[list->n].family = nd->ndm_family;
    list->e[list->n].len = (unsigned char)RTA_PAYLOAD(a);
    memcpy(list->e[list->n].addr, RTA_DATA(a), RTA_PAYLOAD(a));
    list->n++;
  }
}

/* Deletes interface `index`'s neighbour (ARP and NDP) entries. */
static int flush_neighbours(int fd, int index) {
  static struct neigh_list list;
  for (int round = 0; round < 8; round++) {
    memset(&list, 0, sizeof list);
    list.index = index;
    struct nlreq req;
    nl_init(&req, RTM_GETNEIGH, NLM_F_DUMP, sizeof req.u.neigh);
    req.u.neigh.ndm_family = AF_UNSPEC;
    if (nl_talk(fd, &req, each_neigh, &list) < 0) return -1;
    if (list.n == 0) return 0;
    for (int i = 0; i < list.n; i++) {
      nl_init(&req, RTM_DELNEIGH, 0, sizeof req.u.neigh);
      req.u.neigh.ndm_family = list.e[i].family;
      req.u.neigh.ndm_ifindex = index;
      nl_attr(&req, NDA_DST, list.e[i].addr, list.e[i].len);
      if (nl_talk(fd, &req, NULL, NULL) < 0 && errno != ENOENT) return -1;
    }
    /* A full list may have left some: dump again. */
    if (list.n < MAX_NEIGH) return 0;
  }
  return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Gratuitous ARP */

/* An ARP request for our own address, from it, to the broadcast address: peers (and the
 * switch) learn the MAC that now holds this IP. */
static int gratuitous_arp(int index, const unsigned char mac[6], struct in_addr ip) {
  int fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, htons(ETH_P_ARP));
  if (fd < 0) return -1;
  struct __attribute__((packed)) {
    struct arphdr h;
    unsigned char sha[6];
    unsigned char spa[4];
    unsigned char tha[6];
    unsigned char tpa[4];
  } pkt;
  memset(&pkt, 0, sizeof pkt);
  pkt.h.ar_hrd = htons(ARPHRD_ETHER);
  pkt.h.ar_pro = htons(ETH_P_IP);
  pkt.h.ar_hln = 6;
  pkt.h.ar_pln = 4;
  pkt.h.ar_op = htons(ARPOP_REQUEST);
  memcpy(pkt.sha, mac, 6);
  memcpy(pkt.spa, &ip, 4);
  memcpy(pkt.tpa, &ip, 4);
  struct sockaddr_ll to = {
      .sll_family = AF_PACKET,
      .sll_protocol = htons(ETH_P_ARP),
      .sll_ifindex = index,
      .sll_halen = 6,
  };
  memset(to.sll_addr, 0xff, 6);
  ssize_t n = sendto(fd, &pkt, sizeof pkt, 0, (struct sockaddr *)&to, sizeof to);
  int saved = errno;
  close(fd);
  errno = saved;
  return n == (ssize_t)sizeof pkt ? 0 : -1;
}

/* ---------------------------------------------------------------------------------------- */
/* Configuring eth0 */

/* eth0's address (none: NULL, its addresses removed) and default route (none: NULL), eth0 up.
 * On failure *step names what failed and errno why. */
static int configure(int s, int nl, int index, const struct in_addr *ip, int prefix,
                     const struct in_addr *gw, const char **step) {
  *step = "address flush";
  if (flush_addrs(nl, index) < 0) return -1;
  *step = "address";
  if (ip && add_addr(nl, index, *ip, prefix) < 0) return -1;
  *step = "link up";
  if (set_up(s, IFNAME, 1) < 0) return -1;
  *step = "route";
  return set_default_route(nl, index, gw);
}

/* ---------------------------------------------------------------------------------------- */
/* Commands */

static void cmd_mac(int argc, char **argv) {
  unsigned char mac[6], now[6];
  char text[18];
  if (argc != 2 || parse_mac(argv[1], mac) < 0) {
    say("err mac invalid address %s", argc > 1 ? argv[1] : "(none)");
    return;
  }
  int s = ioctl_sock();
  if (s < 0 || if_nametoindex(IFNAME) == 0) {
    say("err mac no eth0");
  } else {
    int changed;
    const char *step;
    if (set_mac(s, mac, &changed, &step) < 0)
      say("err mac %s: %s", step, strerror(errno));
    else if (get_mac(s, now) < 0)
      say("err mac mac read: %s", strerror(errno));
    else {
      format_mac(now, text);
      say("ok mac %s", text);
    }
  }
  if (s >= 0) close(s);
}

/* query rng: RNG_BYTES from getrandom(2), in hex. Never blocks: a CRNG not yet initialized
 * is an error. */
static void query_rng(void) {
  unsigned char buf[RNG_BYTES];
  char hex[2 * RNG_BYTES + 1];
  ssize_t n;
  do {
    n = getrandom(buf, sizeof buf, GRND_NONBLOCK);
  } while (n < 0 && errno == EINTR);
  if (n < 0) FAIL("err query rng %s", errno == EAGAIN ? "not ready" : strerror(errno));
  if (n != (ssize_t)sizeof buf) FAIL("err query rng short read of %zd bytes", n);
  for (size_t i = 0; i < sizeof buf; i++) snprintf(hex + 2 * i, 3, "%02x", buf[i]);
  explicit_bzero(buf, sizeof buf);
  say("ok rng %s", hex);
}

static void cmd_query(int argc, char **argv) {
  const char *what = argc > 1 ? argv[1] : "";
  /* Before anything else: the draw is the first thing this command asks of the kernel. */
  if (argc == 2 && strcmp(what, "rng") == 0) {
    query_rng();
    return;
  }
  int s = ioctl_sock();
  unsigned char mac[6];
  char mac_text[18] = "-";
  int have_nic = s >= 0 && get_mac(s, mac) == 0;
  if (have_nic) format_mac(mac, mac_text);
  if (argc == 2 && strcmp(what, "mac") == 0 && have_nic) {
    say("ok mac %s", mac_text);
  } else if (argc == 2 && strcmp(what, "net") == 0) {
    char addr[INET_ADDRSTRLEN + 4] = "-", gw_text[INET_ADDRSTRLEN] = "-";
    if (have_nic) format_addr(s, addr, sizeof addr);
    int nl = nl_open();
    struct in_addr gw;
    if (nl >= 0 && get_gateway(nl, &gw) == 0) inet_ntop(AF_INET, &gw, gw_text, sizeof gw_text);
    if (nl >= 0) close(nl);
    say("ok net %s %s %s", mac_text, addr, gw_text);
  } else {
    say("err query %.64s", what);
  }
  if (s >= 0) close(s);
}

/* Feeds the kernel RNG 32 bytes from the host, credited in full, and reseeds the CRNG at once:
 * a fork's random numbers stop matching its source's. */
static int reseed(const unsigned char seed[SEED_BYTES]) {
  union {
    struct rand_pool_info info;
    unsigned char raw[sizeof(struct rand_pool_info) + SEED_BYTES];
  } pool;
  memset(&pool, 0, sizeof pool);
  pool.info.entropy_count = SEED_BYTES * 8;
  pool.info.buf_size = SEED_BYTES;
  memcpy(pool.info.buf, seed, SEED_BYTES);
  int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  int r = ioctl(fd, RNDADDENTROPY, &pool);
  if (r == 0) r = ioctl(fd, RNDRESEEDCRNG);
  int saved = errno;
  close(fd);
  explicit_bzero(&pool, sizeof pool);
  errno = saved;
  return r;
}

/* Replaces the image's machine id, if it has one (write a temp file, rename it over). */
static int write_machine_id(const char *id) {
  struct stat st;
  if (stat(MACHINE_ID, &st) < 0) return errno == ENOENT || errno == ENOTDIR ? 0 : -1;
  int fd = open(MACHINE_ID_TMP, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, st.st_mode & 0777);
  if (fd < 0) return -1;
  char text[MACHINE_ID_CHARS + 1];
  memcpy(text, id, MACHINE_ID_CHARS);
  text[MACHINE_ID_CHARS] = '\n';
  ssize_t n = write(fd, text, sizeof text);
  int saved = errno;
  if (close(fd) < 0 && n == (ssize_t)sizeof text) {
    saved = errno;
    n = -1;
  }
  if (n != (ssize_t)sizeof text || rename(MACHINE_ID_TMP, MACHINE_ID) < 0) {
    if (n == (ssize_t)sizeof text) saved = errno;
    unlink(MACHINE_ID_TMP);
    errno = saved ? saved : EIO;
    return -1;
  }
  return 0;
}

/* identity NAME MAC|- ADDR|- GW|- MACHINEID SEED: everything applied, then read back. */
static void cmd_identity(int argc, char **argv) {
  if (argc != 7) {
    say("err identity takes NAME MAC ADDR GW MACHINEID SEED, got %d arguments", argc - 1);
    return;
  }
  const char *name = argv[1], *mac_arg = argv[2], *addr_arg = argv[3], *gw_arg = argv[4];
  unsigned char mac[6], seed[SEED_BYTES], id_bytes[MACHINE_ID_CHARS / 2];
  struct in_addr ip, gw;
  int prefix = 0;
  int nic = strcmp(mac_arg, "-") != 0, has_addr = strcmp(addr_arg, "-") != 0,
      has_gw = strcmp(gw_arg, "-") != 0;
  /* Every argument is checked before anything is changed. */
  if (!valid_hostname(name)) FAIL("err identity hostname %.64s invalid", name);
  if (nic && parse_mac(mac_arg, mac) < 0) FAIL("err identity mac %.32s invalid", mac_arg);
  if (has_addr && parse_cidr(addr_arg, &ip, &prefix) < 0)
    FAIL("err identity address %.32s invalid", addr_arg);
  if (has_gw && parse_ip(gw_arg, &gw) < 0)
    FAIL("err identity gateway %.32s invalid", gw_arg);
  if (!nic && (has_addr || has_gw)) FAIL("err identity address without a NIC");
  if (parse_hex(argv[5], id_bytes, sizeof id_bytes, 1) < 0)
    FAIL("err identity machine id invalid");
  if (parse_hex(argv[6], seed, sizeof seed, 0) < 0) FAIL("err identity seed invalid");

  if (sethostname(name, strlen(name)) < 0)
    FAIL("err identity hostname: %s", strerror(errno));
  int r = reseed(seed);
  explicit_bzero(seed, sizeof seed);
  if (r < 0) FAIL("err identity rng: %s", strerror(errno));
  if (write_machine_id(argv[5]) < 0) FAIL("err identity machine id: %s", strerror(errno));

  char mac_text[18] = "-", addr_text[INET_ADDRSTRLEN + 4] = "-";
  if (nic) {
    int s = ioctl_sock(), nl = nl_open();
    int index = (int)if_nametoindex(IFNAME);
    const char *step = "socket";
    int changed = 0, ok = s >= 0 && nl >= 0;
    if (ok && index == 0) {
      step = "no eth0";
      ok = 0;
    }
    if (ok) ok = set_mac(s, mac, &changed, &step) == 0;
    if (ok) ok = configure(s, nl, index, has_addr ? &ip : NULL, prefix, has_gw ? &gw : NULL,
                           &step) == 0;
    /* The link going down flushed the neighbours; with the same MAC it did not go down. */
    if (ok && !changed) {
      step = "neighbour flush";
      ok = flush_neighbours(nl, index) == 0;
    }
    if (ok && has_addr) {
      step = "gratuitous arp";
      ok = gratuitous_arp(index, mac, ip) == 0;
    }
    unsigned char now[6];
    if (ok) {
      step = "mac read";
      ok = get_mac(s, now) == 0;
    }
    if (ok) {
      format_mac(now, mac_text);
      format_addr(s, addr_text, sizeof addr_text);
    } else {
      say("err identity %s: %s", step, strerror(errno));
    }
    if (s >= 0) close(s);
    if (nl >= 0) close(nl);
    if (!ok) return;
  }
  struct utsname u;
  if (uname(&u) < 0) FAIL("err identity uname: %s", strerror(errno));
  say("ok identity %s %s %s", u.nodename, mac_text, addr_text);
}

static void cmd_stop(void) {
  char text[32];
  int fd = open(PROGRAM_PID, O_RDONLY | O_CLOEXEC);
  ssize_t n = fd < 0 ? -1 : read(fd, text, sizeof text - 1);
  if (fd >= 0) close(fd);
  if (n <= 0) FAIL("err stop no program to stop");
  text[n] = '\0';
  char *end;
  long pid = strtol(text, &end, 10);
  /* Never pid 1 (this guest's init) nor a group. */
  if (end == text || (*end && *end != '\n') || pid <= 1 || pid > INT_MAX)
    FAIL("err stop no program to stop");
  if (kill((pid_t)pid, SIGTERM) < 0) FAIL("err stop no program to stop");
  say("ok stop");
}

/* Answers one line into `reply`; leaves it empty for an empty line (no reply). */
static void handle(char *line) {
  char *argv[MAX_ARGS + 1];
  int argc = 0;
  reply[0] = '\0';
  for (char *tok = strtok(line, " \t"); tok; tok = strtok(NULL, " \t")) {
    if (argc == MAX_ARGS) {
      say("err %.32s too many arguments", argv[0]);
      return;
    }
    argv[argc++] = tok;
  }
  argv[argc] = NULL;
  if (argc == 0) return;
  const char *verb = argv[0];
  if (strcmp(verb, "ping") == 0)
    say("pong");
  else if (strcmp(verb, "mac") == 0)
    cmd_mac(argc, argv);
  else if (strcmp(verb, "query") == 0)
    cmd_query(argc, argv);
  else if (strcmp(verb, "identity") == 0)
    cmd_identity(argc, argv);
  else if (strcmp(verb, "stop") == 0)
    cmd_stop();
  else
    say("err %.32s unknown command", verb);
}

/* ---------------------------------------------------------------------------------------- */
/* The port */

/* /dev/vportNpM of the port named PORT_NAME; -1 until it exists. */
static int find_port(char *dev, size_t len) {
  DIR *d = opendir("/sys/class/virtio-ports");
  if (!d) return -1;
  int found = -1;
  for (struct dirent *e; found < 0 && (e = readdir(d));) {
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

static void sleep_ms(long ms) {
  struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
  }
}

/* Opens the port for SIGIO-driven, non-blocking reads; waits up to 10 s for it to appear. */
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
    sleep_ms(100);
  }
  return -1;
}

/* Waits for SIGIO (the host connected or sent data), at most a second. */
static void wait_sigio(const sigset_t *io) {
  static const struct timespec fallback = {.tv_sec = 1};
  sigtimedwait(io, NULL, &fallback);
}

/* Writes the reply line. The host's data can arrive before virtio_console has processed the
 * port-open message that came with it (a separate virtqueue): until then a write finds the host
 * "disconnected" and fails with EAGAIN, so it waits for that message's SIGIO and tries again.
 * Gives up after 2 s (the host went away, or stopped reading). */
static void send_reply(int fd, const sigset_t *io) {
  size_t len = strlen(reply);
  reply[len++] = '\n';
  size_t off = 0;
  struct timespec now, deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += 2;
  while (off < len) {
    ssize_t n = write(fd, reply + off, len - off);
    if (n > 0) {
      off += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || errno != EAGAIN) break;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec > deadline.tv_sec ||
        (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec))
      break;
    static const struct timespec slice = {.tv_nsec = 100 * 1000000L};
    sigtimedwait(io, NULL, &slice);
  }
}

/* The verb of an overlong line, for its err reply: its first word, bounded and printable. */
static void overlong(const char *buf, size_t len) {
  char verb[33];
  size_t n = 0;
  while (n < len && n < sizeof verb - 1 && buf[n] > ' ' && buf[n] < 127) {
    verb[n] = buf[n];
    n++;
  }
  verb[n] = '\0';
  say("err %s line over %d bytes", n ? verb : "line", MAX_LINE);
}

static int serve(void) {
  sigset_t io;
  sigemptyset(&io);
  sigaddset(&io, SIGIO);
  /* Blocked, so SIGIO only ever becomes pending and sigtimedwait takes it. */
  sigprocmask(SIG_BLOCK, &io, NULL);
  signal(SIGPIPE, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  int fd = open_port();
  if (fd < 0) {
    fprintf(stderr, "offshoot-ctl: no control port %s\n", PORT_NAME);
    return 1;
  }
  /* One line being read; `skipping`: the rest of an overlong line is dropped up to its end. */
  static char buf[MAX_LINE + 1];
  size_t len = 0;
  int skipping = 0;
  for (;;) {
    char chunk[256];
    ssize_t n = read(fd, chunk, sizeof chunk);
    if (n == 0) {
      /* EOF: no host connected. Whatever part of a line it left is dropped. */
      len = 0;
      skipping = 0;
      wait_sigio(&io);
      continue;
    }
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) {
        wait_sigio(&io);
        continue;
      }
      /* Unexpected (the device went away?): reopen it rather than give up the channel. */
      fprintf(stderr, "offshoot-ctl: read: %s; reopening the port\n", strerror(errno));
      close(fd);
      sleep_ms(1000);
      while ((fd = open_port()) < 0) sleep_ms(1000);
      len = 0;
      skipping = 0;
      continue;
    }
    for (ssize_t i = 0; i < n; i++) {
      char c = chunk[i];
      if (c == '\n') {
        if (!skipping) {
          if (len > 0 && buf[len - 1] == '\r') len--;
          buf[len] = '\0';
          handle(buf);
          if (reply[0]) send_reply(fd, &io);
        }
        len = 0;
        skipping = 0;
      } else if (skipping) {
        continue;
      } else if (len == MAX_LINE) {
        overlong(buf, len);
        send_reply(fd, &io);
        skipping = 1;
        len = 0;
      } else {
        /* A NUL would cut the line short unnoticed: taken as a space. */
        buf[len++] = c ? c : ' ';
      }
    }
  }
}

/* ---------------------------------------------------------------------------------------- */
/* Boot */

/* net [ADDR [GW]]: lo up; with ADDR, eth0 gets it and comes up, with GW the default route. An
 * empty or "-" argument is none. */
static int boot_net(int argc, char **argv) {
  const char *addr_arg = argc > 2 ? argv[2] : "", *gw_arg = argc > 3 ? argv[3] : "";
  int has_addr = *addr_arg && strcmp(addr_arg, "-") != 0;
  int has_gw = *gw_arg && strcmp(gw_arg, "-") != 0;
  struct in_addr ip, gw;
  int prefix = 0;
  if (argc > 4 || (has_addr && parse_cidr(addr_arg, &ip, &prefix) < 0) ||
      (has_gw && parse_ip(gw_arg, &gw) < 0) || (has_gw && !has_addr)) {
    fprintf(stderr, "offshoot-ctl: usage: net [ADDR/PREFIX [GATEWAY]]\n");
    return 2;
  }
  int s = ioctl_sock();
  if (s < 0 || set_up(s, "lo", 1) < 0) {
    fprintf(stderr, "offshoot-ctl: lo up: %s\n", strerror(errno));
    return 1;
  }
  int code = 0;
  if (has_addr) {
    int index = (int)if_nametoindex(IFNAME), nl = nl_open();
    const char *step = "no eth0";
    if (index == 0 || nl < 0 ||
        configure(s, nl, index, &ip, prefix, has_gw ? &gw : NULL, &step) < 0) {
      fprintf(stderr, "offshoot-ctl: eth0 %s: %s\n", step, strerror(errno));
      code = 1;
    }
    if (nl >= 0) close(nl);
  }
  close(s);
  return code;
}

/* do COMMAND…: the words joined into one command line, answered on stdout (for a shell in the
 * guest, and for trying the commands on a host). Exit status 1 for an err reply. */
static int do_command(int argc, char **argv) {
  static char line[MAX_LINE + 1];
  size_t len = 0;
  for (int i = 2; i < argc; i++) {
    size_t n = strlen(argv[i]);
    if (len + n + 1 > MAX_LINE) {
      fprintf(stderr, "offshoot-ctl: a command line is at most %d bytes\n", MAX_LINE);
      return 2;
    }
    if (len) line[len++] = ' ';
    memcpy(line + len, argv[i], n);
    len += n;
  }
  line[len] = '\0';
  handle(line);
  if (reply[0]) printf("%s\n", reply);
  return strncmp(reply, "err ", 4) == 0;
}

/* ---- as: run the program as the image's User ----------------------------------------------- */

/* Field `want` (0-based) of the line of `file` whose field 0 is `name` (or, when `by_id`, whose
 * field 2 is `name`), copied into out. Returns 0 when found. */
static int colon_field(const char *file, const char *name, int key, int want, char *out, size_t n) {
  FILE *f = fopen(file, "r");
  if (!f) return -1;
  char line[1024];
  int found = -1;
  while (found < 0 && fgets(line, sizeof line, f)) {
    line[strcspn(line, "\n")] = '\0';
    char *fields[8] = {0};
    int nf = 0;
    for (char *p = line, *tok; nf < 8 && (tok = strsep(&p, ":")) != NULL;) fields[nf++] = tok;
    if (nf > key && nf > want && strcmp(fields[key], name) == 0) {
      snprintf(out, n, "%s", fields[want]);
      found = 0;
    }
  }
  fclose(f);
  return found;
}

static int numeric(const char *s) {
  if (!*s) return 0;
  for (; *s; s++)
    if (!isdigit((unsigned char)*s)) return 0;
  return 1;
}

/* Supplementary groups: every /etc/group line listing `user`, plus gid. */
static int member_groups(const char *user, gid_t gid, gid_t *out, int max) {
  int n = 0;
  out[n++] = gid;
  FILE *f = fopen("/etc/group", "r");
  if (!f || !*user) {
    if (f) fclose(f);
    return n;
  }
  char line[4096];
  while (n < max && fgets(line, sizeof line, f)) {
    line[strcspn(line, "\n")] = '\0';
    char *fields[4] = {0};
    int nf = 0;
    for (char *p = line, *tok; nf < 4 && (tok = strsep(&p, ":")) != NULL;) fields[nf++] = tok;
    if (nf < 4 || !numeric(fields[2])) continue;
    for (char *p = fields[3], *m; (m = strsep(&p, ",")) != NULL;) {
      if (strcmp(m, user) == 0 && (gid_t)strtoul(fields[2], NULL, 10) != gid) {
        out[n++] = (gid_t)strtoul(fields[2], NULL, 10);
        break;
      }
    }
  }
  fclose(f);
  return n;
}

/* Resolves USER as Docker does: a name must be in /etc/passwd (its gid and home come along); a
 * uid need not be (gid 0 then); ":group" overrides the gid. HOME is set from the passwd entry
 * when the environment has none. */
static int run_as(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: offshoot-ctl as USER PROG [ARGS...]\n");
    return 2;
  }
  char spec[256];
  snprintf(spec, sizeof spec, "%s", argv[2]);
  char *group = strchr(spec, ':');
  if (group) *group++ = '\0';
  char field[256], name[256] = "", home[256] = "/";
  uid_t uid;
  gid_t gid = 0;
  if (numeric(spec)) {
    uid = (uid_t)strtoul(spec, NULL, 10);
    if (colon_field("/etc/passwd", spec, 2, 0, name, sizeof name) == 0) {
      if (colon_field("/etc/passwd", spec, 2, 3, field, sizeof field) == 0) gid = (gid_t)strtoul(field, NULL, 10);
      colon_field("/etc/passwd", spec, 2, 5, home, sizeof home);
    }
  } else {
    if (colon_field("/etc/passwd", spec, 0, 2, field, sizeof field) < 0) {
      fprintf(stderr, "offshoot: user %s not found in the image's /etc/passwd\n", spec);
      return 126;
    }
    uid = (uid_t)strtoul(field, NULL, 10);
    snprintf(name, sizeof name, "%s", spec);
    if (colon_field("/etc/passwd", spec, 0, 3, field, sizeof field) == 0) gid = (gid_t)strtoul(field, NULL, 10);
    colon_field("/etc/passwd", spec, 0, 5, home, sizeof home);
  }
  if (group && *group) {
    if (numeric(group)) {
      gid = (gid_t)strtoul(group, NULL, 10);
    } else if (colon_field("/etc/group", group, 0, 2, field, sizeof field) == 0) {
      gid = (gid_t)strtoul(field, NULL, 10);
    } else {
      fprintf(stderr, "offshoot: group %s not found in the image's /etc/group\n", group);
      return 126;
    }
  }
  gid_t groups[64];
  int ngroups = member_groups(name, gid, groups, 64);
  if (setgroups((size_t)ngroups, groups) < 0 || setgid(gid) < 0 || setuid(uid) < 0) {
    fprintf(stderr, "offshoot: cannot become %s: %s\n", argv[2], strerror(errno));
    return 126;
  }
  if (!getenv("HOME")) setenv("HOME", *home ? home : "/", 1);
  execvp(argv[3], argv + 3);
  fprintf(stderr, "offshoot: %s: %s\n", argv[3], strerror(errno));
  return errno == ENOENT ? 127 : 126;
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "";
  if (strcmp(mode, "serve") == 0 && argc == 2) return serve();
  if (strcmp(mode, "net") == 0) return boot_net(argc, argv);
  if (strcmp(mode, "do") == 0) return do_command(argc, argv);
  if (strcmp(mode, "as") == 0) return run_as(argc, argv);
  fprintf(stderr, "usage: offshoot-ctl serve | net [ADDR/PREFIX [GATEWAY]] | do COMMAND... | as USER PROG...\n");
  return 2;
}
