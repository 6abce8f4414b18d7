/*
** redis.h: a Redis connection on the core's libuv loop (redis.c), for
** bus:redis (lua/buzz/redis.lua). Plain C: no Lua here. Commands are
** written in RESP (by redis.c: hiredis 0.14's redisFormatCommandArgv
** formats with sprintf, a quarter of a publish) over a TCP socket buzz
** owns; replies are parsed by hiredis's redisReader and queued, in the
** order the commands were sent, for the Lua layer to pull
** (buzz__redis_next). hiredis's own connection and its libuv adapter are
** not used: the socket, its timeouts and its errors are ours. C never
** calls Lua.
*/
#ifndef BUZZ_REDIS_H
#define BUZZ_REDIS_H

#include <stddef.h>
#include <stdint.h>

#include "buzz.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

typedef struct buzz_redis buzz_redis;
struct redisReply;

enum { BUZZ_REDIS_CONNECTING = 0, BUZZ_REDIS_READY = 1,
       BUZZ_REDIS_CLOSED = 2 };

/* Connects to host:port (an address, or a name looked up once, here) on
** loop's libuv loop; the connection is made in the background and fails
** after timeout_ms. Commands may be sent at once: they go out when it is
** made. 0 or BUZZ_ENOMEM, BUZZ_EINVAL (host; err says why).
** CONSTRUCTOR: buzz__redis_connect()   DESTRUCTOR: buzz__redis_close() */
int buzz__redis_connect(buzz_loop *loop, const char *host, int port,
                        int64_t timeout_ms, buzz_redis **out, char *err,
                        size_t errlen);
/* Queues one command (argc arguments, binary-safe). BUZZ_ECLOSED once
** the connection is closed, BUZZ_ENOMEM. */
int buzz__redis_send(buzz_redis *r, int argc, const char **argv,
                     const size_t *argvlen);
/* Runs the loop's pending I/O once without blocking, then pops the oldest
** reply (the caller frees it: freeReplyObject); NULL when none. */
struct redisReply *buzz__redis_next(buzz_redis *r);
/* True while replies wait to be popped. */
int buzz__redis_has_replies(const buzz_redis *r);
/* BUZZ_REDIS_*; when closed, *why says why ("connection refused", ...). */
int buzz__redis_state(const buzz_redis *r, const char **why);
/* Commands sent whose replies have not been popped yet. */
size_t buzz__redis_waiting(const buzz_redis *r);
/* Closes the connection (idempotent on the handles) and frees it once
** its handles have closed; queued replies are dropped. */
void buzz__redis_close(buzz_redis *r);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
