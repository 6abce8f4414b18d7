/*
** http.h: the HTTP/1.1 server of bus:serve (http.c), on the core's libuv
** loop. Plain C: no Lua here. The server parses requests (Node's
** http_parser, from Debian's libhttp-parser) and queues each complete one;
** the Lua layer pulls them (buzz__http_next), answers with bytes it wrote
** itself (buzz__http_write) and says when a response ends. A connection
** the Lua layer holds (a request handed out, or a stream it keeps open)
** is reported once more when it closes (kind BUZZ_HTTP_CLOSED), so the
** Lua layer can let go of it. C never calls Lua.
*/
#ifndef BUZZ_HTTP_H
#define BUZZ_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "buzz.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

typedef struct buzz_http buzz_http;

typedef struct buzz_http_opts {
  size_t max_header;        /* bytes of request line and headers (431) */
  size_t max_body;          /* bytes of body (413) */
  size_t max_buffer;        /* bytes a connection may have unsent */
  int64_t timeout_ms;       /* to read a whole request (408), and the */
                            /* idle time of a kept-alive connection */
  int max_conns;            /* open connections; more are refused (503) */
} buzz_http_opts;

enum { BUZZ_HTTP_REQUEST = 1, BUZZ_HTTP_CLOSED = 2 };

/* A queued request, or the news that a held connection closed. The
** caller of buzz__http_next owns it: buzz__http_req_free. */
typedef struct buzz_http_req {
  struct buzz_http_req *next;
  uint64_t conn;            /* the connection's id */
  int kind;                 /* BUZZ_HTTP_* */
  int keep_alive;           /* the client keeps the connection */
  const char *method;       /* static: "GET", "POST", ... */
  char *url;                /* NUL-terminated */
  char *fields;             /* nfields (name, value) pairs, each */
  int nfields;              /* NUL-terminated, one after the other */
  char *body;               /* nbody bytes (NUL-terminated too) */
  size_t nbody;
  char peer[48];            /* the client's address, "ip:port" */
} buzz_http_req;

/* Flags of buzz__http_write. */
enum {
  BUZZ_HTTP_END = 1,        /* the response is complete */
  BUZZ_HTTP_CLOSE = 2,      /* close the connection once it is sent */
  BUZZ_HTTP_FORCE = 4       /* past max_buffer (a last message) */
};

/* Listens on host:port (port 0: one the system picks) on loop's libuv
** loop. 0 or BUZZ_ENOMEM, BUZZ_EINVAL (host), BUZZ_ELOOP (err says why).
** CONSTRUCTOR: buzz__http_listen()   DESTRUCTOR: buzz__http_close() */
int buzz__http_listen(buzz_loop *loop, const char *host, int port,
                      const buzz_http_opts *o, buzz_http **out, char *err,
                      size_t errlen);
/* The port listened on. */
int buzz__http_port(const buzz_http *s);
/* Runs the loop's pending I/O once without blocking, then pops the
** oldest queued request; NULL when none. */
buzz_http_req *buzz__http_next(buzz_http *s);
void buzz__http_req_free(buzz_http_req *r);
/* Queues len bytes for connection conn. BUZZ_ECLOSED when it is gone,
** BUZZ_EFULL when they would pass max_buffer (nothing queued; FORCE
** ignores the limit), BUZZ_ENOMEM. END ends the response: the
** connection reads its next request, or closes with CLOSE. */
int buzz__http_write(buzz_http *s, uint64_t conn, const char *data,
                     size_t len, int flags);
/* Bytes queued and unsent on conn (0 when it is gone). */
size_t buzz__http_queued(buzz_http *s, uint64_t conn);
/* True while requests wait to be popped. */
int buzz__http_has_queued(const buzz_http *s);
/* Open connections. */
int buzz__http_count(const buzz_http *s);
/* Stops listening, closes every connection, frees s once libuv has
** closed their handles (they close on the loop's next runs). */
void buzz__http_close(buzz_http *s);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
