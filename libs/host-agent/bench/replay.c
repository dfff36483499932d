/*
 * KVMI replay generator for the host-agent throughput bench (B5, issue #7). Compiled by
 * bench/throughput.mjs with the system `cc`; it plays the KVM + QEMU side of N VMs so that the simulator
 * is not the bottleneck.
 *
 *   replay gen  <socket> <templates> <vms> <vcpus> <inflight> <warmup-s> <measure-s> [raw]
 *   replay echo <socket> <templates>
 *
 * The templates file is written by the bench driver from a transcript recorded against the real
 * simulator (nothing here is encoded by hand): records of [u32 type][u32 key][u32 len][len bytes],
 *   1  the QEMU handshake struct (104 bytes, kvmi-v7-libkvmi.md §3) — uuid and name patched per VM
 *   2  the agent's 24-byte handshake reply (struct_size + SHA-1 of the secret) — checked byte for byte
 *   3  the simulator's reply to a command, key = command id (seq patched per command)
 *   4  a vCPU event frame, key = template index (seq and vcpu patched per event)
 *   5  the agent's reply to event template `key` (used by `echo` as its reply template)
 *
 * gen: connects <vms> sockets, performs the handshake (unless `raw`), answers every command from the
 * type-3 table (an unknown id gets -KVM_ENOSYS), and waits for "go" on stdin. Then each of the
 * vms × vcpus vCPU streams keeps <inflight> events outstanding (1 = as KVM: the vCPU waits for the reply),
 * cycling through the event templates; every reply is checked (id, vcpu, seq) and counted. After the
 * warm-up it prints "measure" and, after the measured window, one JSON line, then exits.
 *
 * echo: the raw baseline responder — accepts connections and answers each event frame with the recorded
 * reply, seq/vcpu patched and new_val copied from the event's new_value (nothing decoded).
 *
 * Single-threaded, poll(2), non-blocking sockets; writes are batched per read.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define T_HANDSHAKE 1
#define T_HS_REPLY 2
#define T_CMD_REPLY 3
#define T_EVENT 4
#define T_EV_REPLY 5
#define MAX_IDS 256
#define MAX_TEMPLATES 16
#define HS_REPLY_SIZE 24
#define EVENT_MSG_ID 1
#define HIST_US 1000000

typedef struct {
  uint8_t *b;
  uint32_t n;
} blob;

static blob handshake, hs_reply, cmd_reply[MAX_IDS], ev[MAX_TEMPLATES], ev_reply[MAX_TEMPLATES];
static int n_ev;

static void die(const char *what) {
  fprintf(stderr, "replay: %s: %s\n", what, errno ? strerror(errno) : "failed");
  exit(2);
}

static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void load(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) die(path);
  uint32_t h[3];
  while (fread(h, 4, 3, f) == 3) {
    blob x = {malloc(h[2] ? h[2] : 1), h[2]};
    if (!x.b || fread(x.b, 1, h[2], f) != h[2]) die("templates: short record");
    if (h[0] == T_HANDSHAKE) handshake = x;
    else if (h[0] == T_HS_REPLY) hs_reply = x;
    else if (h[0] == T_CMD_REPLY && h[1] < MAX_IDS) cmd_reply[h[1]] = x;
    else if (h[0] == T_EVENT && h[1] < MAX_TEMPLATES) { ev[h[1]] = x; if ((int)h[1] + 1 > n_ev) n_ev = (int)h[1] + 1; }
    else if (h[0] == T_EV_REPLY && h[1] < MAX_TEMPLATES) ev_reply[h[1]] = x;
    else { errno = 0; die("templates: unknown record"); }
  }
  fclose(f);
  for (int i = 0; i < n_ev; i++) if (ev[i].n < 8 + 552) { errno = 0; die("templates: event template missing or short"); }
}

/* ---- per-connection buffers ------------------------------------------------------------------------ */

typedef struct {
  int fd;
  int state; /* 0 handshake reply pending, 1 KVMI */
  uint8_t *in;
  size_t in_len, in_cap;
  uint8_t *out;
  size_t out_off, out_len, out_cap;
} conn;

static void out_reserve(conn *c, size_t n) {
  if (c->out_off > 0 && c->out_off == c->out_len) c->out_off = c->out_len = 0;
  if (c->out_len + n <= c->out_cap) return;
  if (c->out_off > 0) {
    memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
    c->out_len -= c->out_off;
    c->out_off = 0;
    if (c->out_len + n <= c->out_cap) return;
  }
  while (c->out_len + n > c->out_cap) c->out_cap = c->out_cap ? c->out_cap * 2 : 65536;
  c->out = realloc(c->out, c->out_cap);
  if (!c->out) die("realloc");
}

static uint8_t *out_put(conn *c, const uint8_t *src, size_t n) {
  out_reserve(c, n);
  uint8_t *p = c->out + c->out_len;
  memcpy(p, src, n);
  c->out_len += n;
  return p;
}

/* Write what the socket takes now; returns -1 when the peer is gone. */
static int flush_out(conn *c) {
  while (c->out_off < c->out_len) {
    ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
    if (w < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      if (errno == EINTR) continue;
      return -1;
    }
    c->out_off += (size_t)w;
  }
  c->out_off = c->out_len = 0;
  return 0;
}

/* Read what is available; returns -1 on EOF/error. */
static int fill_in(conn *c) {
  for (;;) {
    if (c->in_cap - c->in_len < 65536) {
      c->in_cap = c->in_cap ? c->in_cap * 2 : 262144;
      c->in = realloc(c->in, c->in_cap);
      if (!c->in) die("realloc");
    }
    ssize_t r = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
    if (r > 0) { c->in_len += (size_t)r; if ((size_t)r < 65536) return 0; continue; }
    if (r == 0) return -1;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    if (errno == EINTR) continue;
    return -1;
  }
}

static void consume(conn *c, size_t n) {
  memmove(c->in, c->in + n, c->in_len - n);
  c->in_len -= n;
}

static void nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
}

/* ---- gen -------------------------------------------------------------------------------------------- */

typedef struct {
  uint32_t next_seq;   /* per VM, as KVM's per-VM counter */
} vmstate;

static int VMS, VCPUS, INFLIGHT;
static conn *conns;
static vmstate *vms;
/* Per vCPU stream: outstanding seqs (ring of INFLIGHT), send times, template cursor. */
static uint32_t *out_seq;
static double *out_t;
static int *out_head, *out_n, *cursor;
static int running, measuring;
static uint64_t replies, sent, cmds, bad;
static uint32_t *hist;
static double loop_now, measure_t0;
/* Slow replies (over 1 ms): counted, and the first few kept with when they happened, so a tail can be
   matched to what else the machine did at that moment (GC, timers, steal). */
#define SLOW_KEEP 16
static uint64_t over_1ms, over_5ms;
static int n_slow;
static double slow_at_ms[SLOW_KEEP], slow_us[SLOW_KEEP];

static void send_event(int vm, int vcpu) {
  conn *c = &conns[vm];
  int s = vm * VCPUS + vcpu;
  int t = cursor[s];
  cursor[s] = (t + 1) % n_ev;
  uint8_t *p = out_put(c, ev[t].b, ev[t].n);
  uint32_t seq = vms[vm].next_seq++;
  wr32(p + 4, seq);
  wr16(p + 18, (uint16_t)vcpu); /* kvmi_vcpu_event.vcpu: payload 8 + 2 */
  int k = (out_head[s] + out_n[s]) % INFLIGHT;
  out_seq[s * INFLIGHT + k] = seq;
  out_t[s * INFLIGHT + k] = loop_now;
  out_n[s]++;
  sent++;
}

static void on_frame(int vm, const uint8_t *f, uint32_t size) {
  conn *c = &conns[vm];
  uint16_t id = rd16(f);
  uint32_t seq = rd32(f + 4);
  if (id == EVENT_MSG_ID) {
    /* An event reply: kvmi_vcpu_hdr.vcpu at payload offset 0. */
    int vcpu = size >= 2 ? rd16(f + 8) : -1;
    int s = vm * VCPUS + vcpu;
    if (vcpu < 0 || vcpu >= VCPUS || out_n[s] == 0 || out_seq[s * INFLIGHT + out_head[s]] != seq) {
      bad++;
      return;
    }
    double t = out_t[s * INFLIGHT + out_head[s]];
    out_head[s] = (out_head[s] + 1) % INFLIGHT;
    out_n[s]--;
    if (measuring) {
      replies++;
      double us = (loop_now - t) * 1e6;
      hist[us < HIST_US - 1 ? (int)us : HIST_US - 1]++;
      if (us > 1000) {
        over_1ms++;
        if (us > 5000) over_5ms++;
        if (n_slow < SLOW_KEEP) { slow_at_ms[n_slow] = (t - measure_t0) * 1e3; slow_us[n_slow++] = us; }
      }
    }
    if (running) send_event(vm, vcpu);
    return;
  }
  /* A command: answer from the recorded table. */
  cmds++;
  if (id < MAX_IDS && cmd_reply[id].b) {
    uint8_t *p = out_put(c, cmd_reply[id].b, cmd_reply[id].n);
    wr32(p + 4, seq);
  } else {
    uint8_t r[16] = {0};
    wr16(r, id);
    wr16(r + 2, 8);
    wr32(r + 4, seq);
    int32_t err = -38; /* -KVM_ENOSYS */
    memcpy(r + 8, &err, 4);
    out_put(c, r, 16);
  }
}

static int process_in(int vm) {
  conn *c = &conns[vm];
  size_t off = 0;
  if (c->state == 0) {
    if (c->in_len < HS_REPLY_SIZE) return 0;
    if (hs_reply.n == HS_REPLY_SIZE && memcmp(c->in, hs_reply.b, HS_REPLY_SIZE) != 0) {
      fprintf(stderr, "replay: VM %d: the handshake reply differs from the recorded one (cookie?)\n", vm);
      return -1;
    }
    off = HS_REPLY_SIZE;
    c->state = 1;
  }
  while (c->in_len - off >= 8) {
    uint32_t size = rd16(c->in + off + 2);
    if (c->in_len - off < 8 + size) break;
    on_frame(vm, c->in + off, size);
    off += 8 + size;
  }
  if (off) consume(c, off);
  return 0;
}

static uint64_t pct(uint64_t total, double p) {
  uint64_t want = (uint64_t)(p * (double)total), acc = 0;
  for (int i = 0; i < HIST_US; i++) {
    acc += hist[i];
    if (acc > want) return (uint64_t)i;
  }
  return HIST_US;
}

static void print_result(double secs, uint64_t sent_n, int raw) {
  printf("{\"vms\":%d,\"vcpus\":%d,\"streams\":%d,\"inflight\":%d,\"templates\":%d,\"raw\":%s,\"seconds\":%.3f,"
         "\"replies\":%llu,\"sent\":%llu,\"eventsPerSec\":%.0f,\"bad\":%llu,\"commands\":%llu,"
         "\"rttUs\":{\"p50\":%llu,\"p99\":%llu,\"max\":%llu},\"over1ms\":%llu,\"over5ms\":%llu,\"slow\":[",
         VMS, VCPUS, VMS * VCPUS, INFLIGHT, n_ev, raw ? "true" : "false", secs, (unsigned long long)replies,
         (unsigned long long)sent_n, (double)replies / secs, (unsigned long long)bad,
         (unsigned long long)cmds, (unsigned long long)pct(replies, 0.5), (unsigned long long)pct(replies, 0.99),
         (unsigned long long)pct(replies, 0.999999), (unsigned long long)over_1ms, (unsigned long long)over_5ms);
  for (int i = 0; i < n_slow; i++) printf("%s{\"atMs\":%.1f,\"us\":%.0f}", i ? "," : "", slow_at_ms[i], slow_us[i]);
  printf("]}\n");
  fflush(stdout);
}

static int gen(int argc, char **argv) {
  if (argc < 9) { errno = 0; die("usage: gen <socket> <templates> <vms> <vcpus> <inflight> <warmup-s> <measure-s> [raw]"); }
  const char *path = argv[2];
  load(argv[3]);
  VMS = atoi(argv[4]);
  VCPUS = atoi(argv[5]);
  INFLIGHT = atoi(argv[6]);
  double warmup = atof(argv[7]), measure = atof(argv[8]);
  int raw = argc > 9 && strcmp(argv[9], "raw") == 0;
  if (VMS < 1 || VCPUS < 1 || INFLIGHT < 1 || n_ev < 1) { errno = 0; die("bad arguments or no event templates"); }
  if (!raw && handshake.n < 96) { errno = 0; die("no handshake template"); }
  conns = calloc((size_t)VMS, sizeof *conns);
  vms = calloc((size_t)VMS, sizeof *vms);
  int streams = VMS * VCPUS;
  out_seq = calloc((size_t)streams * (size_t)INFLIGHT, sizeof *out_seq);
  out_t = calloc((size_t)streams * (size_t)INFLIGHT, sizeof *out_t);
  out_head = calloc((size_t)streams, sizeof(int));
  out_n = calloc((size_t)streams, sizeof(int));
  cursor = calloc((size_t)streams, sizeof(int));
  hist = calloc(HIST_US, sizeof *hist);
  if (!conns || !vms || !out_seq || !out_t || !out_head || !out_n || !cursor || !hist) die("calloc");
  for (int s = 0; s < streams; s++) cursor[s] = s % n_ev;
  for (int i = 0; i < VMS; i++) {
    conn *c = &conns[i];
    c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (c->fd < 0) die("socket");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    nonblock(c->fd);
    vms[i].next_seq = 0x1000;
    c->state = raw ? 1 : 0;
    if (!raw) {
      uint8_t *p = out_put(c, handshake.b, handshake.n);
      /* uuid (offset 4, 16 bytes): recorded prefix, the VM index in the last 4 bytes. */
      p[4 + 11] = 0xb5;
      wr32(p + 4 + 12, (uint32_t)i + 1);
      /* name (offset 32, 64 bytes) */
      memset(p + 32, 0, 64);
      snprintf((char *)p + 32, 64, "replay-%d", i);
    }
  }
  struct pollfd *pf = calloc((size_t)VMS + 1, sizeof *pf);
  if (!pf) die("calloc");
  char line[64];
  size_t line_len = 0;
  int stdin_open = 1;
  double t_start = 0, t_measure = 0, t_end = 0;
  int open_conns = VMS;
  uint64_t sent_at_measure = 0;
  for (;;) {
    loop_now = now_s();
    if (running && !measuring && loop_now - t_start >= warmup) {
      measuring = 1;
      t_measure = loop_now;
      measure_t0 = loop_now;
      sent_at_measure = sent;
      printf("measure\n");
      fflush(stdout);
    }
    if (measuring && running && loop_now - t_measure >= measure) {
      /* Stop sending; keep answering (the agent's detach commands) until it closes or stdin ends. */
      t_end = loop_now;
      running = 0;
      measuring = 0;
      print_result(t_end - t_measure, sent - sent_at_measure, raw);
    }
    if (t_end > 0 && (!stdin_open || open_conns == 0)) return 0;
    for (int i = 0; i < VMS; i++) {
      pf[i].fd = conns[i].fd; /* -1 once closed: poll ignores it */
      pf[i].events = POLLIN | (conns[i].out_len > conns[i].out_off ? POLLOUT : 0);
      pf[i].revents = 0;
    }
    pf[VMS].fd = stdin_open ? 0 : -1;
    pf[VMS].events = POLLIN;
    pf[VMS].revents = 0;
    int r = poll(pf, (nfds_t)VMS + 1, 100);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    loop_now = now_s();
    if (pf[VMS].revents) {
      ssize_t n = read(0, line + line_len, sizeof line - 1 - line_len);
      if (n <= 0) stdin_open = 0;
      else {
        line_len += (size_t)n;
        line[line_len] = 0;
        if (strstr(line, "go") && !running) {
          running = 1;
          t_start = loop_now;
          for (int v = 0; v < VMS; v++)
            for (int k = 0; k < VCPUS; k++)
              for (int j = 0; j < INFLIGHT; j++) send_event(v, k);
        }
        line_len = 0;
      }
    }
    for (int i = 0; i < VMS; i++) {
      conn *c = &conns[i];
      if (pf[i].revents & (POLLIN | POLLHUP | POLLERR)) {
        if (fill_in(c) < 0) {
          if (t_end == 0) {
            fprintf(stderr, "replay: VM %d: the agent closed the connection\n", i);
            return 3;
          }
          close(c->fd);
          c->fd = -1;
          open_conns--;
          continue;
        }
        if (process_in(i) < 0) return 3;
      }
      if (c->fd >= 0 && c->out_len > c->out_off && flush_out(c) < 0) {
        if (t_end > 0) { close(c->fd); c->fd = -1; open_conns--; continue; }
        fprintf(stderr, "replay: VM %d: write failed: %s\n", i, strerror(errno));
        return 3;
      }
    }
  }
}

/* ---- echo ------------------------------------------------------------------------------------------- */

static int echo(int argc, char **argv) {
  if (argc < 4) { errno = 0; die("usage: echo <socket> <templates>"); }
  load(argv[3]);
  const blob *rep = &ev_reply[0];
  if (!rep->b || rep->n < 24) { errno = 0; die("no event reply template"); }
  int ls = socket(AF_UNIX, SOCK_STREAM, 0);
  if (ls < 0) die("socket");
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
  unlink(argv[2]);
  if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 1024) < 0) die("bind/listen");
  nonblock(ls);
  printf("ready\n");
  fflush(stdout);
  int cap = 1024, n = 0;
  conn *cs = calloc((size_t)cap, sizeof *cs);
  struct pollfd *pf = calloc((size_t)cap + 1, sizeof *pf);
  if (!cs || !pf) die("calloc");
  for (;;) {
    pf[0].fd = ls;
    pf[0].events = POLLIN;
    for (int i = 0; i < n; i++) {
      pf[i + 1].fd = cs[i].fd;
      pf[i + 1].events = POLLIN | (cs[i].out_len > cs[i].out_off ? POLLOUT : 0);
      pf[i + 1].revents = 0;
    }
    if (poll(pf, (nfds_t)n + 1, 1000) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (getppid() == 1) return 0; /* the bench went away */
    if (pf[0].revents & POLLIN) {
      int fd;
      while (n < cap && (fd = accept(ls, NULL, NULL)) >= 0) {
        nonblock(fd);
        memset(&cs[n], 0, sizeof cs[n]);
        cs[n].fd = fd;
        cs[n].state = 1;
        n++;
      }
    }
    for (int i = 0; i < n; i++) {
      conn *c = &cs[i];
      if (c->fd < 0) continue;
      if (pf[i + 1].revents & (POLLIN | POLLHUP | POLLERR)) {
        if (fill_in(c) < 0) { close(c->fd); c->fd = -1; continue; }
        size_t off = 0;
        while (c->in_len - off >= 8) {
          uint32_t size = rd16(c->in + off + 2);
          if (c->in_len - off < 8 + size) break;
          const uint8_t *f = c->in + off;
          if (rd16(f) == EVENT_MSG_ID && size >= 552 + 24) {
            uint8_t *p = out_put(c, rep->b, rep->n);
            wr32(p + 4, rd32(f + 4));          /* seq */
            wr16(p + 8, rd16(f + 18));         /* kvmi_vcpu_hdr.vcpu ← kvmi_vcpu_event.vcpu */
            memcpy(p + rep->n - 8, f + 8 + 552 + 16, 8); /* new_val ← the CR event's new_value */
          }
          off += 8 + size;
        }
        if (off) consume(c, off);
      }
      if (c->out_len > c->out_off && flush_out(c) < 0) { close(c->fd); c->fd = -1; }
    }
  }
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc > 1 && strcmp(argv[1], "gen") == 0) return gen(argc, argv);
  if (argc > 1 && strcmp(argv[1], "echo") == 0) return echo(argc, argv);
  errno = 0;
  die("usage: replay gen|echo …");
}
