/*
** redis.c: a Redis connection on the core's libuv loop (redis.h).
**
** One TCP handle and one timer (the connect deadline) per connection,
** both in the connection's own malloc'd block. Commands are written in
** RESP straight into an output buffer; at most one libuv write is in flight, and
** what is sent meanwhile waits in the buffer and goes out in one write
** when it completes, so a burst of commands is pipelined without a system
** call each. Bytes read are fed to hiredis's redisReader and each whole
** reply is queued in arrival order, which is the order of the commands.
**
** Invariants: state only moves CONNECTING -> READY -> CLOSED (or
** CONNECTING -> CLOSED); once CLOSED nothing is written or read and the
** handles are closing. The connection counts as I/O on the loop
** (buzz__loop_io) from connect until it closes, so bus:run() waits for
** its replies. The block is freed when both handles have closed and the
** owner has called buzz__redis_close, whichever comes last.
**
** It does not touch Lua, and no callback here runs Lua code.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#include "redis.h"

typedef struct reply_node {
  struct reply_node *next;
  redisReply *reply;
} reply_node;

typedef struct out_write {
  uv_write_t w;
  buzz_redis *r;
  char *data;
} out_write;

struct buzz_redis {
  buzz_loop *bl;
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_connect_t creq;
  redisReader *reader;      /* owns */
  int state;                /* BUZZ_REDIS_* */
  char why[160];            /* why it closed */
  char *out;                /* owns: bytes to send, nout of them */
  size_t nout, capout;
  int is_writing;           /* a write is in flight */
  reply_node *head, *tail;  /* owns: replies not yet popped */
  size_t waiting;           /* commands sent, replies not popped */
  int open_handles;         /* handles not yet closed */
  int is_released;          /* the owner called buzz__redis_close */
  int is_io;                /* counted in buzz__loop_io */
  char rbuf[16384];         /* what a read brings, before the reader */
};

static void free_block(buzz_redis *r) {
  reply_node *n = r->head, *next;
  for (; n != NULL; n = next) {
    next = n->next;
    freeReplyObject(n->reply);
    free(n);
  }
  if (r->reader) redisReaderFree(r->reader);
  free(r->out);
  free(r);
}

static void on_handle_closed(uv_handle_t *h) {
  buzz_redis *r = (buzz_redis *)h->data;
  if (--r->open_handles == 0 && r->is_released) free_block(r);
}

/* Marks the connection closed, with why as the reason. */
static void mark_closed(buzz_redis *r, const char *why) {
  r->state = BUZZ_REDIS_CLOSED;
  snprintf(r->why, sizeof r->why, "%s", why);
  if (r->is_io) {
    r->is_io = 0;
    buzz__loop_io(r->bl, -1);
  }
}

static void close_handles(buzz_redis *r) {
  uv_close((uv_handle_t *)&r->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&r->timer, on_handle_closed);
}

/* Closes the handles (once), with why as the reason. */
static void fail(buzz_redis *r, const char *why) {
  if (r->state == BUZZ_REDIS_CLOSED) return;
  mark_closed(r, why);
  close_handles(r);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  buzz_redis *r = (buzz_redis *)req->data;
  (void)status;
  free(req);
  close_handles(r);
}

static void flush(buzz_redis *r);

static void on_written(uv_write_t *w, int status) {
  out_write *ow = (out_write *)w;
  buzz_redis *r = ow->r;
  free(ow->data);
  free(ow);
  r->is_writing = 0;
  if (status < 0) {
    char why[120];
    snprintf(why, sizeof why, "write failed: %s", uv_strerror(status));
    fail(r, why);
    return;
  }
  flush(r);
}

/* Hands the buffered bytes to libuv, unless a write is in flight. */
static void flush(buzz_redis *r) {
  out_write *ow;
  uv_buf_t b;
  if (r->state != BUZZ_REDIS_READY || r->is_writing || r->nout == 0) return;
  if ((ow = malloc(sizeof *ow)) == NULL) {
    fail(r, "out of memory");
    return;
  }
  ow->r = r;
  ow->data = r->out;
  b = uv_buf_init(r->out, (unsigned)r->nout);
  r->out = NULL;
  r->nout = r->capout = 0;
  r->is_writing = 1;
  if (uv_write(&ow->w, (uv_stream_t *)&r->tcp, &b, 1, on_written) != 0) {
    free(ow->data);
    free(ow);
    r->is_writing = 0;
    fail(r, "write failed");
  }
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  buzz_redis *r = (buzz_redis *)h->data;   /* fed to the reader at once */
  (void)hint;
  b->base = r->rbuf;
  b->len = sizeof r->rbuf;
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  buzz_redis *r = (buzz_redis *)st->data;
  void *reply;
  if (n == 0) return;
  if (n < 0) {
    char why[120];
    if (n == UV_EOF) {
      snprintf(why, sizeof why, "the server closed the connection");
    } else {
      snprintf(why, sizeof why, "read failed: %s", uv_strerror((int)n));
    }
    fail(r, why);
    return;
  }
  if (redisReaderFeed(r->reader, b->base, (size_t)n) != REDIS_OK) {
    fail(r, "out of memory");
    return;
  }
  for (;;) {
    reply_node *node;
    reply = NULL;
    if (redisReaderGetReply(r->reader, &reply) != REDIS_OK) {
      char why[160];
      snprintf(why, sizeof why, "protocol error: %s", r->reader->errstr);
      fail(r, why);
      return;
    }
    if (reply == NULL) break;
    if ((node = malloc(sizeof *node)) == NULL) {
      freeReplyObject(reply);
      fail(r, "out of memory");
      return;
    }
    node->next = NULL;
    node->reply = (redisReply *)reply;
    if (r->tail) r->tail->next = node; else r->head = node;
    r->tail = node;
  }
}

static void on_connect(uv_connect_t *req, int status) {
  buzz_redis *r = (buzz_redis *)req->data;
  if (r->state != BUZZ_REDIS_CONNECTING) return;  /* timed out, closed */
  if (status < 0) {
    char why[120];
    snprintf(why, sizeof why, "cannot connect: %s", uv_strerror(status));
    fail(r, why);
    return;
  }
  uv_timer_stop(&r->timer);
  uv_tcp_nodelay(&r->tcp, 1);
  r->state = BUZZ_REDIS_READY;
  if (uv_read_start((uv_stream_t *)&r->tcp, on_alloc, on_read) != 0) {
    fail(r, "cannot read from the connection");
    return;
  }
  flush(r);
}

static void on_connect_timeout(uv_timer_t *t) {
  fail((buzz_redis *)t->data, "cannot connect: timed out");
}

/* The address of host:port into ss; 0, or -1 with err set. */
static int resolve(uv_loop_t *loop, const char *host, int port,
                   struct sockaddr_storage *ss, char *err, size_t errlen) {
  uv_getaddrinfo_t req;
  struct addrinfo hints;
  char service[16];
  int rc;
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0 ||
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  snprintf(service, sizeof service, "%d", port);
  rc = uv_getaddrinfo(loop, &req, NULL, host, service, &hints);
  if (rc != 0 || req.addrinfo == NULL) {
    snprintf(err, errlen, "cannot resolve %s: %s", host,
             rc != 0 ? uv_strerror(rc) : "no address");
    return -1;
  }
  memcpy(ss, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
  uv_freeaddrinfo(req.addrinfo);
  return 0;
}

int buzz__redis_connect(buzz_loop *bl, const char *host, int port,
                        int64_t timeout_ms, buzz_redis **out, char *err,
                        size_t errlen) {
  struct sockaddr_storage ss;
  uv_loop_t *loop = buzz__loop_uv(bl);
  buzz_redis *r;
  int rc;
  if (port <= 0 || port > 65535) {
    snprintf(err, errlen, "bad port %d", port);
    return BUZZ_EINVAL;
  }
  memset(&ss, 0, sizeof ss);
  if (resolve(loop, host, port, &ss, err, errlen) != 0) return BUZZ_EINVAL;
  buzz__ignore_sigpipe();
  if ((r = calloc(1, sizeof *r)) == NULL) return BUZZ_ENOMEM;
  if ((r->reader = redisReaderCreate()) == NULL) {
    free(r);
    return BUZZ_ENOMEM;
  }
  r->bl = bl;
  r->state = BUZZ_REDIS_CONNECTING;
  uv_tcp_init(loop, &r->tcp);
  uv_timer_init(loop, &r->timer);
  r->tcp.data = r->timer.data = r->creq.data = r;
  r->open_handles = 2;
  r->is_io = 1;
  buzz__loop_io(bl, 1);
  rc = uv_tcp_connect(&r->creq, &r->tcp, (const struct sockaddr *)&ss,
                      on_connect);
  if (rc != 0) {
    char why[120];
    snprintf(why, sizeof why, "cannot connect: %s", uv_strerror(rc));
    fail(r, why);                      /* reported by state, not here */
  } else {
    uv_timer_start(&r->timer, on_connect_timeout,
                   timeout_ms > 0 ? (uint64_t)timeout_ms : 1, 0);
  }
  *out = r;
  return BUZZ_OK;
}

/* Writes c (a '*' or '$'), n in decimal and CRLF at p; returns the end. */
static char *put_header(char *p, char c, size_t n) {
  char digits[24];
  int k = 0;
  *p++ = c;
  do {
    digits[k++] = (char)('0' + n % 10);
    n /= 10;
  } while (n > 0);
  while (k > 0) *p++ = digits[--k];
  *p++ = '\r';
  *p++ = '\n';
  return p;
}

/*
** The command in RESP, written straight into the output buffer: Debian's
** hiredis 0.14 formats each argument's header with sprintf, which made
** redisFormatCommandArgv a quarter of a publish's instructions (about
** 7,900 of them for an XADD, by callgrind). The reader stays hiredis's.
*/
int buzz__redis_send(buzz_redis *r, int argc, const char **argv,
                     const size_t *argvlen) {
  size_t need = 24, i;
  char *p;
  if (r->state == BUZZ_REDIS_CLOSED) return BUZZ_ECLOSED;
  for (i = 0; i < (size_t)argc; i++) need += argvlen[i] + 26;
  if (r->nout + need > r->capout) {
    size_t cap = r->capout ? r->capout : 256;
    char *q;
    while (cap < r->nout + need) cap *= 2;
    if ((q = realloc(r->out, cap)) == NULL) return BUZZ_ENOMEM;
    r->out = q;
    r->capout = cap;
  }
  p = put_header(r->out + r->nout, '*', (size_t)argc);
  for (i = 0; i < (size_t)argc; i++) {
    p = put_header(p, '$', argvlen[i]);
    memcpy(p, argv[i], argvlen[i]);
    p += argvlen[i];
    *p++ = '\r';
    *p++ = '\n';
  }
  r->nout = (size_t)(p - r->out);
  r->waiting++;
  flush(r);
  return BUZZ_OK;
}

redisReply *buzz__redis_next(buzz_redis *r) {
  reply_node *n;
  redisReply *reply;
  if (r->head == NULL) buzz__loop_poll(r->bl);
  if ((n = r->head) == NULL) return NULL;
  r->head = n->next;
  if (r->head == NULL) r->tail = NULL;
  reply = n->reply;
  free(n);
  if (r->waiting > 0) r->waiting--;
  return reply;
}

int buzz__redis_has_replies(const buzz_redis *r) {
  return r->head != NULL;
}

int buzz__redis_state(const buzz_redis *r, const char **why) {
  if (why) *why = r->why;
  return r->state;
}

size_t buzz__redis_waiting(const buzz_redis *r) {
  return r->waiting;
}

/*
** What was sent still goes out: the last bytes are handed to libuv, and
** the handles close once the socket is shut down after them (an ack or a
** lease's release sent just before closing is not lost).
*/
void buzz__redis_close(buzz_redis *r) {
  if (r == NULL) return;
  r->is_released = 1;
  if (r->state == BUZZ_REDIS_READY && (r->is_writing || r->nout > 0)) {
    uv_shutdown_t *req = malloc(sizeof *req);
    int is_writing = r->is_writing;
    r->is_writing = 0;                 /* flush: one more write at once */
    flush(r);
    if (req != NULL && (r->is_writing || is_writing)) {
      req->data = r;
      if (uv_shutdown(req, (uv_stream_t *)&r->tcp, on_shutdown) == 0) {
        uv_read_stop((uv_stream_t *)&r->tcp);
        mark_closed(r, "closed");
        return;
      }
    }
    free(req);
  }
  fail(r, "closed");
  if (r->open_handles == 0) free_block(r);
}
