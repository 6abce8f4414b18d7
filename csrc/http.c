/*
** http.c: the HTTP/1.1 server of bus:serve, on the core's libuv loop
** (contract in http.h).
**
** A connection reads one request at a time. http_parser (Debian's
** libhttp-parser) calls back with the URL, header fields and values and
** body pieces; they are gathered in the connection's buffers, within
** max_header and max_body. When a message is complete the parser is
** paused and the request is queued for the Lua layer; reading goes on,
** so a client that leaves is seen at once (a stream's end), and bytes
** that come after the request (a pipelined one) wait in `rest` until
** the response ends. A request that breaks a limit or does not parse gets
** its status (400, 408, 413, 431, 501) from here and the connection
** closes: the Lua layer never sees it.
**
** Connections are found by id: slot index in the low 24 bits, a
** generation above, so an id of a closed connection never reaches a new
** one in the same slot.
**
** Writes copy the bytes into one malloc'd block per write, freed when
** libuv has written it; `queued` counts what is in flight against
** max_buffer (a client that stops reading fills it: EFULL, and the Lua
** layer ends the stream).
**
** Lifetime: the server frees itself when its listener and every
** connection have closed (refs); buzz__http_close starts that. A
** connection frees itself when both its handles (tcp, timer) closed.
*/
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <http_parser.h>
#include <uv.h>

#include "http.h"

#define SLOT_BITS 24
#define SLOT_MASK ((1u << SLOT_BITS) - 1)

typedef struct conn conn;

struct buzz_http {
  buzz_loop *bl;
  uv_loop_t *loop;
  uv_tcp_t listener;
  buzz_http_opts o;
  conn **slots;             /* by slot index; NULL: free */
  uint32_t *gens;           /* generation of each slot */
  uint32_t nslots, cap;
  int nconns;
  int refs;                 /* listener + connections not yet freed */
  int is_closing;
  int port;
  buzz_http_req *head, *tail;   /* the queue for the Lua layer */
};

enum { READING, HELD, CLOSING };

struct conn {
  uv_tcp_t tcp;             /* first: a uv_handle_t * is a conn * */
  uv_timer_t timer;
  http_parser parser;
  buzz_http *s;
  uint64_t id;
  uint32_t slot;
  int state;
  int is_closed;            /* its handles are closing */
  int is_known;             /* the Lua layer has seen a request of it */
  int close_after;          /* close once the writes are out */
  int handles;              /* open handles (tcp, timer) */
  int was_value;            /* the last header piece was a value */
  int reject;               /* status to answer a refused request with */
  int has_bytes;            /* some of the current request has arrived */
  char *head;               /* url \0 (field \0 value \0)* */
  size_t nhead, caphead;
  int nfields;
  char *body;
  size_t nbody, capbody;
  char *rest;               /* read past a complete request */
  size_t nrest, caprest;
  size_t queued;            /* bytes written, not yet sent */
  char peer[48];
};

typedef struct wreq {
  uv_write_t w;
  conn *c;
  size_t len;
  char data[];
} wreq;

static http_parser_settings settings;

/* Appends n bytes to *buf (length *len, capacity *cap), keeping a NUL
** after them. 0 or -1 (no memory). */
static int append(char **buf, size_t *len, size_t *cap, const char *p,
                  size_t n) {
  if (*len + n + 1 > *cap) {
    size_t ncap = *cap ? *cap * 2 : 256;
    char *nb;
    while (ncap < *len + n + 1) ncap *= 2;
    if ((nb = realloc(*buf, ncap)) == NULL) return -1;
    *buf = nb;
    *cap = ncap;
  }
  memcpy(*buf + *len, p, n);
  *len += n;
  (*buf)[*len] = '\0';
  return 0;
}

/* Appends a piece of the URL or of a header, or the NUL that ends one. */
static int head_add(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (c->nhead + n + 1 > c->s->o.max_header) {
    c->reject = 431;
    return -1;
  }
  if (append(&c->head, &c->nhead, &c->caphead, at, n) != 0) {
    c->reject = 503;
    return -1;
  }
  return 0;
}

static int head_end(http_parser *p) {
  return head_add(p, "", 1);             /* the NUL that ends a piece */
}

static int on_message_begin(http_parser *p) {
  conn *c = p->data;
  c->nhead = c->nbody = 0;
  c->nfields = 0;
  c->was_value = 0;
  c->has_bytes = 1;
  return 0;
}

static int on_url(http_parser *p, const char *at, size_t n) {
  return head_add(p, at, n);
}

static int on_header_field(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (c->was_value || c->nfields == 0) {   /* a new field: the end of */
    if (head_end(p) != 0) return -1;       /* the url or the last value */
    c->was_value = 0;
    c->nfields++;
  }
  return head_add(p, at, n);
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (!c->was_value) {
    if (head_end(p) != 0) return -1;       /* ends the field's name */
    c->was_value = 1;
  }
  return head_add(p, at, n);
}

static int on_headers_complete(http_parser *p) {
  conn *c = p->data;
  if (head_end(p) != 0) return -1;       /* ends the url or the value */
  if (c->nfields > 0 && !c->was_value && head_end(p) != 0) return -1;
  if (p->upgrade) {                        /* WebSocket, CONNECT */
    c->reject = 501;
    return -1;
  }
  if ((p->flags & F_CONTENTLENGTH) &&
      p->content_length > (uint64_t)c->s->o.max_body) {
    c->reject = 413;
    return -1;
  }
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (c->nbody + n > c->s->o.max_body) {
    c->reject = 413;
    return -1;
  }
  if (append(&c->body, &c->nbody, &c->capbody, at, n) != 0) {
    c->reject = 503;
    return -1;
  }
  return 0;
}

static void conn_close(conn *c);
static void queue_push(buzz_http *s, buzz_http_req *r);

/* A whole request: queued for the Lua layer; the parser pauses. */
static int on_message_complete(http_parser *p) {
  conn *c = p->data;
  buzz_http_req *r = calloc(1, sizeof *r);
  if (r == NULL) {
    c->reject = 503;
    return -1;
  }
  r->kind = BUZZ_HTTP_REQUEST;
  r->conn = c->id;
  r->keep_alive = http_should_keep_alive(p);
  r->method = http_method_str((enum http_method)p->method);
  r->url = c->head;                        /* the url is the first piece */
  r->fields = c->head + strlen(c->head) + 1;
  r->nfields = c->nfields;
  c->head = NULL;
  c->nhead = c->caphead = 0;
  if (c->body == NULL && append(&c->body, &c->nbody, &c->capbody, "", 0)) {
    free(r->url);
    free(r);
    c->reject = 503;
    return -1;
  }
  r->body = c->body;
  r->nbody = c->nbody;
  c->body = NULL;
  c->nbody = c->capbody = 0;
  memcpy(r->peer, c->peer, sizeof r->peer);
  c->state = HELD;
  c->is_known = 1;
  c->has_bytes = 0;
  uv_timer_stop(&c->timer);              /* reading goes on: a client */
  queue_push(c->s, r);                   /* that leaves is seen at once */
  http_parser_pause(p, 1);
  return 0;
}

static void on_written(uv_write_t *w, int status) {
  wreq *wr = (wreq *)w;
  conn *c = wr->c;
  c->queued -= wr->len;
  free(wr);
  if (status < 0) {
    conn_close(c);
    return;
  }
  if (c->close_after && c->queued == 0) conn_close(c);
}

static int conn_send(conn *c, const char *data, size_t len) {
  wreq *wr;
  uv_buf_t b;
  if (len == 0) return BUZZ_OK;
  if ((wr = malloc(sizeof *wr + len)) == NULL) return BUZZ_ENOMEM;
  memcpy(wr->data, data, len);
  wr->c = c;
  wr->len = len;
  b = uv_buf_init(wr->data, (unsigned)len);
  if (uv_write(&wr->w, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
    free(wr);
    conn_close(c);
    return BUZZ_ECLOSED;
  }
  c->queued += len;
  return BUZZ_OK;
}

/* Answers a refused request itself and closes. */
static void conn_refuse(conn *c, int status) {
  char msg[160];
  const char *why = status == 400 ? "Bad Request"
                  : status == 408 ? "Request Timeout"
                  : status == 413 ? "Payload Too Large"
                  : status == 431 ? "Request Header Fields Too Large"
                  : status == 501 ? "Not Implemented"
                  : "Service Unavailable";
  int n = snprintf(msg, sizeof msg,
                   "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\n"
                   "Content-Length: %d\r\nConnection: close\r\n\r\n%d %s\n",
                   status, why, (int)strlen(why) + 5, status, why);
  uv_read_stop((uv_stream_t *)&c->tcp);
  uv_timer_stop(&c->timer);
  c->state = CLOSING;
  c->close_after = 1;
  if (conn_send(c, msg, (size_t)n) != BUZZ_OK || c->queued == 0)
    conn_close(c);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)h;
  (void)hint;
  b->base = malloc(65536);
  b->len = b->base ? 65536 : 0;
}

/* Keeps n bytes that came while a request is held, for later. */
static void conn_keep(conn *c, const char *data, size_t n) {
  if (c->nrest + n > c->s->o.max_header + c->s->o.max_body ||
      append(&c->rest, &c->nrest, &c->caprest, data, n) != 0)
    conn_close(c);                         /* a flood, not a pipeline */
}

/* Feeds n bytes to the parser; keeps what follows a complete request. */
static void conn_feed(conn *c, const char *data, size_t n) {
  size_t used = http_parser_execute(&c->parser, &settings, data, n);
  enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
  if (e == HPE_PAUSED) {
    if (used < n) conn_keep(c, data + used, n - used);
    return;
  }
  if (e != HPE_OK) conn_refuse(c, c->reject ? c->reject : 400);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  conn *c = (conn *)st;
  if (n > 0 && c->state == READING) {
    conn_feed(c, b->base, (size_t)n);
  } else if (n > 0 && c->state == HELD) {
    conn_keep(c, b->base, (size_t)n);
  } else if (n < 0) {
    conn_close(c);                         /* EOF or an error */
  }
  free(b->base);
}

/* The timer: a request that took too long, or an idle keep-alive. */
static void on_timeout(uv_timer_t *t) {
  conn *c = t->data;
  if (c->state != READING) return;
  if (c->has_bytes) conn_refuse(c, 408);
  else conn_close(c);
}

/* Back to reading requests: the held one has been answered. */
static void conn_read(conn *c) {
  c->state = READING;
  uv_timer_start(&c->timer, on_timeout, (uint64_t)c->s->o.timeout_ms, 0);
  if (c->nrest > 0) {                      /* a pipelined request */
    char *rest = c->rest;
    size_t n = c->nrest;
    c->rest = NULL;
    c->nrest = c->caprest = 0;
    conn_feed(c, rest, n);
    free(rest);
  }
}

static void server_unref(buzz_http *s) {
  buzz_http_req *r, *next;
  if (--s->refs > 0) return;
  for (r = s->head; r != NULL; r = next) {
    next = r->next;
    buzz__http_req_free(r);
  }
  free(s->slots);
  free(s->gens);
  free(s);
}

static void on_conn_closed(uv_handle_t *h) {
  conn *c = h->data;
  buzz_http *s = c->s;
  if (--c->handles > 0) return;
  free(c->head);
  free(c->body);
  free(c->rest);
  free(c);
  server_unref(s);
}

static void queue_push(buzz_http *s, buzz_http_req *r) {
  if (s->tail) s->tail->next = r;
  else s->head = r;
  s->tail = r;
}

/* Closes c's handles; a connection the Lua layer knows is reported. */
static void conn_close(conn *c) {
  buzz_http *s = c->s;
  if (c->is_closed) return;
  c->is_closed = 1;
  c->state = CLOSING;
  s->slots[c->slot] = NULL;
  s->nconns--;
  if (c->is_known && !s->is_closing) {
    buzz_http_req *r = calloc(1, sizeof *r);
    if (r != NULL) {
      r->kind = BUZZ_HTTP_CLOSED;
      r->conn = c->id;
      queue_push(s, r);
    }
  }
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_closed);
}

static int slot_take(buzz_http *s, uint32_t *out) {
  uint32_t i;
  for (i = 0; i < s->nslots; i++)
    if (s->slots[i] == NULL) break;
  if (i == s->nslots) {
    if (s->nslots == s->cap) {
      uint32_t ncap = s->cap ? s->cap * 2 : 64;
      conn **ns;
      uint32_t *ng;
      if (ncap > SLOT_MASK) return -1;
      if ((ns = realloc(s->slots, ncap * sizeof *ns)) == NULL) return -1;
      s->slots = ns;
      if ((ng = realloc(s->gens, ncap * sizeof *ng)) == NULL) return -1;
      s->gens = ng;
      memset(s->gens + s->cap, 0, (ncap - s->cap) * sizeof *ng);
      s->cap = ncap;
    }
    s->nslots++;
  }
  *out = i;
  return 0;
}

static void peer_name(conn *c) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  char ip[40] = "?";
  int port = 0;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
    if (ss.ss_family == AF_INET) {
      struct sockaddr_in *a = (struct sockaddr_in *)&ss;
      uv_ip4_name(a, ip, sizeof ip);
      port = ntohs(a->sin_port);
    } else if (ss.ss_family == AF_INET6) {
      struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
      uv_ip6_name(a, ip, sizeof ip);
      port = ntohs(a->sin6_port);
    }
  }
  snprintf(c->peer, sizeof c->peer, "%s:%d", ip, port);
}

static void on_connection(uv_stream_t *l, int status) {
  buzz_http *s = l->data;
  conn *c;
  uint32_t slot;
  if (status < 0 || s->is_closing) return;
  if ((c = calloc(1, sizeof *c)) == NULL) return;
  uv_tcp_init(s->loop, &c->tcp);
  uv_timer_init(s->loop, &c->timer);
  c->tcp.data = c;
  c->timer.data = c;
  c->s = s;
  c->handles = 2;
  s->refs++;
  s->nconns++;
  if (uv_accept(l, (uv_stream_t *)&c->tcp) != 0 || slot_take(s, &slot)) {
    s->nconns--;
    c->is_closed = 1;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_closed);
    return;
  }
  c->slot = slot;
  c->id = ((uint64_t)++s->gens[slot] << SLOT_BITS) | slot;
  s->slots[slot] = c;
  uv_tcp_nodelay(&c->tcp, 1);
  peer_name(c);
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  if (s->nconns > s->o.max_conns) {
    conn_refuse(c, 503);
    return;
  }
  conn_read(c);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static conn *conn_find(buzz_http *s, uint64_t id) {
  uint32_t slot = (uint32_t)(id & SLOT_MASK);
  conn *c;
  if (slot >= s->nslots || (c = s->slots[slot]) == NULL) return NULL;
  return c->id == id ? c : NULL;
}

static void on_listener_closed(uv_handle_t *h) {
  server_unref(h->data);
}

int buzz__http_listen(buzz_loop *bl, const char *host, int port,
                      const buzz_http_opts *o, buzz_http **out, char *err,
                      size_t errlen) {
  struct sockaddr_storage addr;
  buzz_http *s;
  int rc, len = sizeof addr;
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0) {
    buzz__set_err(err, errlen, "not an IP address: %s", host);
    return BUZZ_EINVAL;
  }
  if ((s = calloc(1, sizeof *s)) == NULL) return BUZZ_ENOMEM;
  buzz__ignore_sigpipe();
  settings.on_message_begin = on_message_begin;
  settings.on_url = on_url;
  settings.on_header_field = on_header_field;
  settings.on_header_value = on_header_value;
  settings.on_headers_complete = on_headers_complete;
  settings.on_body = on_body;
  settings.on_message_complete = on_message_complete;
  s->bl = bl;
  s->loop = buzz__loop_uv(bl);
  s->o = *o;
  s->refs = 1;
  uv_tcp_init(s->loop, &s->listener);
  s->listener.data = s;
  if ((rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&addr, 0)) != 0 ||
      (rc = uv_listen((uv_stream_t *)&s->listener, 511, on_connection))
        != 0) {
    buzz__set_err(err, errlen, "cannot listen on %s:%d: %s", host, port,
                  uv_strerror(rc));
    uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    return BUZZ_ELOOP;
  }
  if (uv_tcp_getsockname(&s->listener, (struct sockaddr *)&addr, &len) == 0)
    s->port = ntohs(addr.ss_family == AF_INET6
                      ? ((struct sockaddr_in6 *)&addr)->sin6_port
                      : ((struct sockaddr_in *)&addr)->sin_port);
  buzz__loop_io(bl, 1);
  *out = s;
  return BUZZ_OK;
}

int buzz__http_port(const buzz_http *s) {
  return s->port;
}

int buzz__http_has_queued(const buzz_http *s) { return s->head != NULL; }
int buzz__http_count(const buzz_http *s) {
  return s->nconns;
}

buzz_http_req *buzz__http_next(buzz_http *s) {
  buzz_http_req *r;
  if (s->head == NULL) buzz__loop_poll(s->bl);
  if ((r = s->head) == NULL) return NULL;
  s->head = r->next;
  if (s->head == NULL) s->tail = NULL;
  r->next = NULL;
  return r;
}

void buzz__http_req_free(buzz_http_req *r) {
  if (r == NULL) return;
  free(r->url);
  free(r->body);
  free(r);
}

int buzz__http_write(buzz_http *s, uint64_t id, const char *data, size_t len,
                     int flags) {
  conn *c = conn_find(s, id);
  int rc;
  if (c == NULL || c->is_closed || c->close_after) return BUZZ_ECLOSED;
  if (!(flags & BUZZ_HTTP_FORCE) && c->queued + len > s->o.max_buffer)
    return BUZZ_EFULL;
  if ((rc = conn_send(c, data, len)) != BUZZ_OK) return rc;
  if (flags & BUZZ_HTTP_CLOSE) {
    c->state = CLOSING;
    c->close_after = 1;
    if (c->queued == 0) conn_close(c);
  } else if (flags & BUZZ_HTTP_END) {
    http_parser_pause(&c->parser, 0);
    conn_read(c);
  }
  return BUZZ_OK;
}

size_t buzz__http_queued(buzz_http *s, uint64_t id) {
  conn *c = conn_find(s, id);
  return c ? c->queued : 0;
}

void buzz__http_close(buzz_http *s) {
  uint32_t i;
  if (s == NULL || s->is_closing) return;
  s->is_closing = 1;
  for (i = 0; i < s->nslots; i++)
    if (s->slots[i] != NULL) conn_close(s->slots[i]);
  buzz__loop_io(s->bl, -1);
  uv_close((uv_handle_t *)&s->listener, on_listener_closed);
}
