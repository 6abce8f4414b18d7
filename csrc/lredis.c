/*
** lredis.c: the binding of redis.c (bus:redis's connections).
**
** core:redis(host, port, timeout_ms) -> a "buzz.redis" userdata on the
** core's loop | nil, err, code. Its methods:
**   conn:send(arg, ...) -> true | nil, err, code
**     (arguments are strings or numbers; integers are sent as integers)
**   conn:sendv(t, n) -> the same, with the arguments t[1..n]
**   conn:next() -> true, value | false, message | nil
**     (the oldest reply: a string for a bulk or status reply, an integer,
**     false for a nil reply, a table (array) for an array reply, in which
**     an error reply is { err = message }; false, message for an error
**     reply; nil when no reply is there yet)
**   conn:state() -> "connecting" | "ready" | "closed", why
**   conn:waiting() -> commands sent whose replies were not popped
**   conn:close()
** The core closes its connections when it closes (lcore.h: redis), so a
** connection never outlives the loop it runs on.
*/
#include <string.h>

#include <hiredis/hiredis.h>

#include "lcore.h"
#include "redis.h"

#define REDIS_MT "buzz.redis"
#define ARGS_MAX 64

struct lredis {
  buzz_redis *r;           /* owns; NULL once closed */
  lcore *c;                /* the core whose loop it runs on */
  struct lredis *next;     /* the core's list (lcore.h: redis) */
};

static struct lredis *check_redis(lua_State *L) {
  struct lredis *h = (struct lredis *)luaL_checkudata(L, 1, REDIS_MT);
  if (h->r == NULL) luaL_error(L, "attempt to use a closed connection");
  return h;
}

static void redis_unlink(struct lredis *h) {
  struct lredis **p;
  for (p = &h->c->redis; *p != NULL; p = &(*p)->next)
    if (*p == h) {
      *p = h->next;
      break;
    }
}

/* core:redis(host, port, timeout_ms) */
static int lredis_connect(lua_State *L) {
  lcore *c = buzz__lcore_check(L);
  const char *host = luaL_checkstring(L, 2);
  int port = (int)luaL_checkinteger(L, 3);
  int64_t timeout_ms = (int64_t)luaL_optinteger(L, 4, 5000);
  struct lredis *h;
  char err[ERR_MAX];
  int rc;
  h = (struct lredis *)lua_newuserdata(L, sizeof *h);
  h->r = NULL;
  h->c = c;
  h->next = NULL;
  luaL_setmetatable(L, REDIS_MT);
  rc = buzz__redis_connect(c->loop, host, port, timeout_ms, &h->r, err,
                           sizeof err);
  if (rc != BUZZ_OK) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: bus:redis: %s", buzz__err_name(rc),
                    rc == BUZZ_ENOMEM ? buzz__err_message(rc) : err);
    lua_pushstring(L, buzz__err_name(rc));
    return 3;
  }
  h->next = c->redis;
  c->redis = h;
  lua_createtable(L, 1, 0);            /* the core lives as long as it */
  lua_pushvalue(L, 1);                 /* (LuaJIT: a table as fenv) */
  lua_rawseti(L, -2, 1);
  buzz_setuv(L, -2);
  return 1;
}

/* conn:send(arg, ...) */
/* n in decimal at s (room for 21 bytes); returns its length. */
static int put_int(char *s, long long n) {
  char digits[24];
  unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n
                               : (unsigned long long)n;
  int k = 0, len = 0;
  do {
    digits[k++] = (char)('0' + u % 10);
    u /= 10;
  } while (u > 0);
  if (n < 0) s[len++] = '-';
  while (k > 0) s[len++] = digits[--k];
  s[len] = '\0';
  return len;
}

/* Sends the argc values from stack slot base on as one command. */
static int send_from(lua_State *L, struct lredis *h, int base, int argc) {
  const char *argv[ARGS_MAX];
  size_t lens[ARGS_MAX];
  char nums[ARGS_MAX][32];
  int i, rc;
  if (argc < 1) return luaL_error(L, "conn:send: no command");
  if (argc > ARGS_MAX)
    return luaL_error(L, "conn:send: more than %d arguments", ARGS_MAX);
  for (i = 0; i < argc; i++) {
    int idx = base + i;
    if (lua_type(L, idx) == LUA_TNUMBER) {
      lua_Number n = lua_tonumber(L, idx);
      int len;
      if (n == (lua_Number)(long long)n && n > -9.2e18 && n < 9.2e18)
        len = put_int(nums[i], (long long)n);
      else
        len = snprintf(nums[i], sizeof nums[i], "%.17g", (double)n);
      argv[i] = nums[i];
      lens[i] = (size_t)len;
    } else {
      argv[i] = luaL_checklstring(L, idx, &lens[i]);
    }
  }
  rc = buzz__redis_send(h->r, argc, argv, lens);
  if (rc != BUZZ_OK) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", buzz__err_name(rc), buzz__err_message(rc));
    lua_pushstring(L, buzz__err_name(rc));
    return 3;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int lredis_send(lua_State *L) {
  struct lredis *h = check_redis(L);
  return send_from(L, h, 2, lua_gettop(L) - 1);
}

/* conn:sendv(t, n): the command t[1..n] (publish's reused table: no
** unpack, no varargs copied twice) */
static int lredis_sendv(lua_State *L) {
  struct lredis *h = check_redis(L);
  int n = (int)luaL_checkinteger(L, 3), i;
  luaL_checktype(L, 2, LUA_TTABLE);
  if (n < 1 || n > ARGS_MAX)
    return luaL_error(L, "conn:sendv: %d arguments (1 to %d)", n, ARGS_MAX);
  lua_settop(L, 3);
  luaL_checkstack(L, n, "conn:sendv");
  for (i = 1; i <= n; i++) lua_rawgeti(L, 2, i);
  return send_from(L, h, 4, n);
}

/* Pushes reply as a Lua value (an error nested in an array: { err }). */
static void push_reply(lua_State *L, const redisReply *rp, int depth) {
  size_t i;
  switch (rp->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS:
    lua_pushlstring(L, rp->str, rp->len);
    break;
  case REDIS_REPLY_INTEGER:
    lua_pushinteger(L, (lua_Integer)rp->integer);
    break;
  case REDIS_REPLY_ARRAY:
    if (depth > 32 || !lua_checkstack(L, 4)) {  /* none of ours nests */
      lua_pushboolean(L, 0);                    /* so (never raises: rp */
      break;                                    /* must be freed) */
    }
    lua_createtable(L, (int)rp->elements, 0);
    for (i = 0; i < rp->elements; i++) {
      push_reply(L, rp->element[i], depth + 1);
      lua_rawseti(L, -2, (int)i + 1);
    }
    break;
  case REDIS_REPLY_ERROR:
    lua_createtable(L, 0, 1);
    lua_pushlstring(L, rp->str, rp->len);
    lua_setfield(L, -2, "err");
    break;
  default:                             /* REDIS_REPLY_NIL */
    lua_pushboolean(L, 0);
  }
}

/* conn:next() */
static int lredis_next(lua_State *L) {
  struct lredis *h = check_redis(L);
  redisReply *rp = buzz__redis_next(h->r);
  int is_error;
  if (rp == NULL) return 0;
  is_error = rp->type == REDIS_REPLY_ERROR;
  lua_pushboolean(L, !is_error);
  if (is_error) {
    lua_pushlstring(L, rp->str, rp->len);
  } else {
    push_reply(L, rp, 0);
  }
  freeReplyObject(rp);
  return 2;
}

static int lredis_state(lua_State *L) {
  struct lredis *h = (struct lredis *)luaL_checkudata(L, 1, REDIS_MT);
  const char *why = "closed";
  int st = h->r ? buzz__redis_state(h->r, &why) : BUZZ_REDIS_CLOSED;
  lua_pushstring(L, st == BUZZ_REDIS_READY ? "ready"
                    : st == BUZZ_REDIS_CONNECTING ? "connecting" : "closed");
  if (st != BUZZ_REDIS_CLOSED) return 1;
  lua_pushstring(L, why);
  return 2;
}

static int lredis_waiting(lua_State *L) {
  struct lredis *h = (struct lredis *)luaL_checkudata(L, 1, REDIS_MT);
  lua_pushinteger(L, h->r ? (lua_Integer)buzz__redis_waiting(h->r) : 0);
  return 1;
}

/* conn:close(): idempotent; also __gc. The handles close on the loop's
** next runs (the core's close runs them). */
static int lredis_close(lua_State *L) {
  struct lredis *h = (struct lredis *)luaL_checkudata(L, 1, REDIS_MT);
  if (h->r != NULL) {
    buzz__redis_close(h->r);
    h->r = NULL;
    redis_unlink(h);
    if (h->c->loop != NULL) buzz__loop_poll(h->c->loop);
  }
  return 0;
}

int buzz__lredis_has_replies(const lcore *c) {
  const struct lredis *h;
  for (h = c->redis; h != NULL; h = h->next)
    if (h->r != NULL && buzz__redis_has_replies(h->r)) return 1;
  return 0;
}

/* Closes the connections of c (lcore_close, before the loop closes). */
void buzz__lredis_close_all(lcore *c) {
  struct lredis *h = c->redis, *next;
  for (; h != NULL; h = next) {
    next = h->next;
    buzz__redis_close(h->r);
    h->r = NULL;
    h->next = NULL;
  }
  c->redis = NULL;
}

const luaL_Reg buzz__lredis_methods[] = {
  { "redis", lredis_connect },
  { NULL, NULL }
};

static const luaL_Reg redis_methods[] = {
  { "send", lredis_send },
  { "sendv", lredis_sendv },
  { "next", lredis_next },
  { "state", lredis_state },
  { "waiting", lredis_waiting },
  { "close", lredis_close },
  { NULL, NULL }
};

void buzz__lredis_register(lua_State *L) {
  if (luaL_newmetatable(L, REDIS_MT)) {
    lua_pushliteral(L, REDIS_MT);
    lua_setfield(L, -2, "__name");
    lua_newtable(L);
    luaL_setfuncs(L, redis_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, lredis_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
}
