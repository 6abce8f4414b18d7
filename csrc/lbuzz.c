/*
** lbuzz.c: the Lua binding of the core, module "buzz.core". The only file
** that includes Lua headers.
**
** A core object ("buzz.core" userdata) embeds the dispatcher and owns the
** libuv loop. Its user value is the ref table U: every Lua value the core
** keeps (payloads, keys, headers, correlation ids, event tables, the Lua
** subscription objects) is a luaL_ref into U, released here when the core
** lets go of it (on_event_free, unsubscribe) or all at once when close()
** drops U. Lua's GC therefore traces everything the core holds.
**
** Conventions (STYLE.md): misuse the Lua layer can phrase better comes back
** as nil, message, "ESUBJECT"/"EINVAL" so lua/buzz/init.lua raises it at
** the caller's level; failures of the world come back as nil, "CODE:
** message", "CODE"; a method on a closed core raises. No malloc'd memory is
** held across a call that can raise: the core's allocations are owned by
** the core object, and strings are built in luaL_Buffer.
**
** Delivery: pump() and publish_sync() run each delivery in a Lua thread
** from a pool (U.pool): the handler is resumed with lua_resume, so it may
** yield; a handler that returns leaves its thread reusable with no yield
** at all. A raise or a yield that nothing here can resume goes to the
** reporter function (U.report, from lua/buzz/init.lua) through lua_pcall.
** While a handler runs, its event is on the "current" stack, from which
** publish inherits the correlation id and takes the causation id.
** next() hands deliveries out one by one instead, for tests and drivers
** that run handlers themselves.
*/
#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "buzz.h"

#define CORE_MT "buzz.core"

#if BUZZ_NOREF != LUA_NOREF
#error "BUZZ_NOREF must equal LUA_NOREF"
#endif

/*
** The core object.
** CONSTRUCTOR: lcore_new()   DESTRUCTOR: lcore_close() (also __gc/__close)
*/
typedef struct lcore {
  buzz_bus bus;        /* owns; embedded */
  buzz_loop *loop;     /* owns; NULL once closed */
  buzz_event **cur;    /* owns the array (freed by __gc); the events whose */
  size_t ncur, capcur; /* handlers are running, innermost last; borrowed */
  int npool;           /* idle threads in the pool table */
  int pool_ref;        /* U refs: the pool of idle threads, and the */
  int report_ref;      /* reporter function (both released with U) */
  int is_open;
  int is_stopped;      /* set by stop(); pump() returns */
} lcore;

#define POOL_MAX 64    /* idle threads kept per core */

/* What on_event_free needs: the state and the stack slot of U. */
typedef struct lctx {
  lua_State *L;
  int u;
} lctx;

/*
** Upvalues of every method: the metatable (for the type check), then the
** strings the hot path uses as table keys and values, so building an
** event table never interns a C string.
*/
enum {
  UV_MT = 1, UV_ID, UV_TYPE, UV_PAYLOAD, UV_TS, UV_PRIORITY, UV_ATTEMPT,
  UV_KEY, UV_CORR, UV_CAUS, UV_HEADERS, UV_ACTIVE, UV_PRIO0,
  UV_COUNT = UV_PRIO0 + BUZZ_NPRIO - 1
};

static const char *const uv_strings[] = {
  "id", "type", "payload", "ts", "priority", "attempt", "key",
  "correlation_id", "causation_id", "headers", "is_active",
  "critical", "high", "normal", "low"
};

#define UV(i) lua_upvalueindex(i)


/* ------------------------------------------------------------ helpers */

/*
** Methods get the metatable as upvalue 1, so the type check is one
** comparison (luaL_checkudata looks the name up in the registry).
*/
static lcore *check_core(lua_State *L) {
  lcore *c = (lcore *)lua_touserdata(L, 1);
  if (c == NULL || !lua_getmetatable(L, 1) ||
      !lua_rawequal(L, -1, lua_upvalueindex(1)))
    c = (lcore *)luaL_checkudata(L, 1, CORE_MT);   /* raises */
  else
    lua_pop(L, 1);
  if (!c->is_open) luaL_error(L, "attempt to use a closed bus");
  return c;
}

/* Pushes U and returns its absolute index. */
static int push_refs(lua_State *L) {
  buzz_getuv(L, 1);
  return lua_gettop(L);
}

/* Returns nil, "CODE: message", "CODE" for a core error. */
static int push_fail(lua_State *L, int rc, const char *detail) {
  lua_pushnil(L);
  if (detail)
    lua_pushfstring(L, "%s: %s", buzz__err_name(rc), detail);
  else
    lua_pushfstring(L, "%s: %s", buzz__err_name(rc), buzz__err_message(rc));
  lua_pushstring(L, buzz__err_name(rc));
  return 3;
}

/* Pushes s quoted, with control bytes escaped and long strings cut. */
static void push_quoted(lua_State *L, const char *s, size_t len) {
  luaL_Buffer b;
  size_t i, n = len > 64 ? 64 : len;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, '"');
  for (i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch < 0x20 || ch == 0x7f || ch == '"' || ch == '\\') {
      char esc[8];
      int k = 0;
      esc[k++] = '\\';
      if (ch == '"' || ch == '\\') esc[k++] = (char)ch;
      else {
        esc[k++] = (char)('0' + ch / 100);
        esc[k++] = (char)('0' + ch / 10 % 10);
        esc[k++] = (char)('0' + ch % 10);
      }
      luaL_addlstring(&b, esc, (size_t)k);
    } else {
      luaL_addchar(&b, (char)ch);
    }
  }
  if (n < len) luaL_addstring(&b, "...");
  luaL_addchar(&b, '"');
  luaL_pushresult(&b);
}

/*
** Returns nil, 'bad <what> "<s>": <why>', "ESUBJECT" if s is not a valid
** subject (pushing 3 values), or 0 if it is. A type starting with '$' is
** refused unless is_reserved_ok (the engine's own types, inspection).
*/
static int subject_usage(lua_State *L, const char *what, const char *s,
                         size_t len, int is_pattern, int is_reserved_ok) {
  const char *why = buzz__subject_check(s, len, is_pattern);
  if (why == NULL) {
    if (is_pattern || is_reserved_ok || s[0] != '$') return 0;
    why = "subjects starting with \"$\" are reserved for the engine "
          "($DLQ.>, $SYS.>); publish a type without the leading \"$\"";
  }
  lua_pushnil(L);
  lua_pushfstring(L, "bad %s ", what);
  push_quoted(L, s, len);
  lua_pushfstring(L, ": %s", why);
  lua_concat(L, 3);
  lua_pushliteral(L, "ESUBJECT");
  return 3;
}

static int ref_opt(lua_State *L, int u, int idx) {
  if (lua_isnoneornil(L, idx)) return BUZZ_NOREF;
  lua_pushvalue(L, idx);
  return luaL_ref(L, u);
}

static void unref(lua_State *L, int u, int *ref) {
  if (*ref >= 0) luaL_unref(L, u, *ref);
  *ref = BUZZ_NOREF;
}

/* bus.c calls this when an event leaves the bus. ctx NULL: U is gone. */
static void on_event_free(void *ctx, buzz_event *ev) {
  lctx *x = (lctx *)ctx;
  if (x == NULL) return;
  unref(x->L, x->u, &ev->payload_ref);
  unref(x->L, x->u, &ev->key_ref);
  unref(x->L, x->u, &ev->corr_ref);
  unref(x->L, x->u, &ev->headers_ref);
  unref(x->L, x->u, &ev->table_ref);
}

/*
** Sets field UV(key) of the table on top from stack slot arg when arg is
** not 0 (and the slot holds a value), else moves the value of *ref.
*/
static void set_field(lua_State *L, int u, int *ref, int arg, int key) {
  if (arg != 0 && !lua_isnoneornil(L, arg)) {
    lua_pushvalue(L, UV(key));
    lua_pushvalue(L, arg);
    lua_rawset(L, -3);
  } else if (*ref != BUZZ_NOREF) {
    lua_pushvalue(L, UV(key));
    lua_rawgeti(L, u, *ref);
    lua_rawset(L, -3);
    unref(L, u, ref);
  }
}

static void set_int(lua_State *L, int key, int64_t v) {
  lua_pushvalue(L, UV(key));
  lua_pushinteger(L, (lua_Integer)v);
  lua_rawset(L, -3);
}

/*
** Pushes the event table of ev, building it on its first delivery. Its
** payload, key and headers come from the refs, or with from_args from the
** publish call's own arguments (slots 3, 5, 8; publish_sync needs no refs
** for them); the correlation id from slot 6 or its ref. The table is kept
** in U (table_ref) until the event leaves the bus, so every subscription
** receives the same table. Only called from methods (uses the upvalues).
*/
static void push_event(lua_State *L, int u, buzz_event *ev, int from_args) {
  if (ev->table_ref != BUZZ_NOREF) {
    lua_rawgeti(L, u, ev->table_ref);
    return;
  }
  lua_createtable(L, 0, 8);  /* 6 fields always, 4 optional: 8 slots fit
                                the usual event; 10 would round up to 16 */
  set_int(L, UV_ID, ev->id);
  lua_pushvalue(L, UV(UV_TYPE));
  lua_pushlstring(L, ev->subject->type, ev->subject->len);
  lua_rawset(L, -3);
  set_field(L, u, &ev->payload_ref, from_args ? 3 : 0, UV_PAYLOAD);
  set_int(L, UV_TS, ev->ts);
  lua_pushvalue(L, UV(UV_PRIORITY));
  lua_pushvalue(L, UV(UV_PRIO0 + ev->priority));
  lua_rawset(L, -3);
  set_int(L, UV_ATTEMPT, 1);
  set_field(L, u, &ev->key_ref, from_args ? 5 : 0, UV_KEY);
  set_field(L, u, &ev->corr_ref, from_args ? 6 : 0, UV_CORR);
  if (ev->causation_id != 0) set_int(L, UV_CAUS, ev->causation_id);
  set_field(L, u, &ev->headers_ref, from_args ? 8 : 0, UV_HEADERS);
  lua_pushvalue(L, -1);
  ev->table_ref = luaL_ref(L, u);
}


/* ----------------------------------------------------------- delivery */

/*
** A once subscription has been handed its delivery and the core has ended
** it: mark its Lua object (at sub_idx) inactive and drop its refs. The
** handler must already be pushed if it is still needed.
*/
static void once_ended(lua_State *L, int u, buzz_sub *sub, int sub_idx) {
  if (lua_istable(L, sub_idx)) {
    lua_pushvalue(L, UV(UV_ACTIVE));
    lua_pushboolean(L, 0);
    lua_rawset(L, sub_idx);
  }
  unref(L, u, &sub->data_ref);
  unref(L, u, &sub->fn_ref);
}

static int cur_push(lcore *c, buzz_event *ev) {
  if (c->ncur == c->capcur) {
    size_t ncap = c->capcur ? c->capcur * 2 : 8;
    buzz_event **n = (buzz_event **)realloc(c->cur, ncap * sizeof *n);
    if (n == NULL) return 0;
    c->cur = n;
    c->capcur = ncap;
  }
  c->cur[c->ncur++] = ev;
  return 1;
}

/*
** Calls U.report(err, ev, sub, trace) for a failed delivery. Reads the
** error at err_idx (or uses msg if err_idx is 0), the sub and the event at
** sub_idx and sub_idx + 1, and the thread co for the traceback. The
** reporter runs protected: its own failure is dropped here (the Lua
** reporter already guards on_error).
*/
static void report(lua_State *L, lcore *c, int u, lua_State *co,
                   int err_idx, const char *msg, int sub_idx) {
  int top = lua_gettop(L);
  lua_rawgeti(L, u, c->report_ref);
  if (err_idx) lua_pushvalue(L, err_idx);
  else lua_pushstring(L, msg);
  lua_pushvalue(L, sub_idx + 1);
  lua_pushvalue(L, sub_idx);
  if (err_idx && lua_type(L, err_idx) == LUA_TSTRING)
    luaL_traceback(L, co, lua_tostring(L, err_idx), 0);
  else if (err_idx)
    luaL_traceback(L, co, "(error object is not a string)", 0);
  else
    lua_pushnil(L);
  if (lua_pcall(L, 4, 0, 0) != 0) lua_pop(L, 1);
  lua_settop(L, top);
}

/*
** Runs one delivery: resumes the sub's handler with the event in a pooled
** thread. Stack: U at u; leaves the stack as it found it. Never raises
** for the handler's sake (except out of memory in the Lua state). Does not
** touch sub after resuming: a handler may close the bus, which frees it.
*/
static void dispatch(lua_State *L, lcore *c, int u, buzz_sub *sub,
                     buzz_event *ev) {
  int top = lua_gettop(L), rc, is_current;
  lua_State *co;
  lua_rawgeti(L, u, sub->data_ref);                 /* top+1: sub */
  push_event(L, u, ev, 0);                          /* top+2: event */
  if (c->npool > 0) {
    lua_rawgeti(L, u, c->pool_ref);
    lua_rawgeti(L, -1, c->npool);
    lua_pushnil(L);
    lua_rawseti(L, -3, c->npool--);
    lua_remove(L, -2);
    co = lua_tothread(L, -1);                       /* top+3: thread */
  } else {
    co = lua_newthread(L);
  }
  lua_rawgeti(L, u, sub->fn_ref);
  lua_pushvalue(L, top + 2);
  lua_xmove(L, co, 2);
  if (sub->is_once) once_ended(L, u, sub, top + 1);
  is_current = cur_push(c, ev);
  rc = buzz_resume(co, L, 1);
  if (is_current) c->ncur--;
  if (rc == LUA_OK) {
    lua_settop(co, 0);
    if (c->npool < POOL_MAX) {
      lua_rawgeti(L, u, c->pool_ref);
      lua_pushvalue(L, top + 3);
      lua_rawseti(L, -2, ++c->npool);
    }
  } else if (rc == LUA_YIELD) {
    buzz_resetthread(co);
    report(L, c, u, co, 0, "handler yielded, but nothing drives this bus to "
           "resume it (yield only under a driver that supports it)", top + 1);
  } else {
    lua_xmove(co, L, 1);                            /* the error value */
    report(L, c, u, co, lua_gettop(L), NULL, top + 1);
    buzz_resetthread(co);
  }
  lua_settop(L, top);
}


/* -------------------------------------------------------------- core */

/*
** core.new(queue_limit, report) -> core | nil, err, code. report(err, ev,
** sub, trace) is called for every failed delivery.
*/
static int lcore_new(lua_State *L) {
  lua_Integer limit = luaL_optinteger(L, 1, 100000);
  lcore *c;
  int rc;
  luaL_argcheck(L, limit >= 0, 1, "queue_limit must be >= 0");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  c = (lcore *)buzz_newud(L, sizeof *c);
  memset(c, 0, sizeof *c);             /* closed until acquired */
  c->bus.is_closed = 1;
  luaL_setmetatable(L, CORE_MT);
  lua_newtable(L);                     /* U */
  lua_newtable(L);
  c->pool_ref = luaL_ref(L, -2);
  lua_pushvalue(L, 2);
  c->report_ref = luaL_ref(L, -2);
  buzz_setuv(L, -2);
  if ((rc = buzz__bus_init(&c->bus, (size_t)limit)) < 0)
    return push_fail(L, rc, NULL);
  c->bus.on_event_free = on_event_free;
  if ((rc = buzz__loop_new(&c->loop)) < 0) {
    buzz__bus_close(&c->bus, NULL);
    return push_fail(L, rc, NULL);
  }
  c->is_open = 1;
  return 1;
}

/*
** core:close() -> number of pending events discarded. Idempotent; also
** __gc and __close, so it never raises.
*/
static int lcore_close(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  size_t n;
  if (!c->is_open) {
    lua_pushinteger(L, 0);
    return 1;
  }
  c->is_open = 0;                      /* mark closed before releasing */
  if (c->bus.slots != NULL) {          /* tell live subscriptions */
    size_t i;
    buzz_getuv(L, 1);
    for (i = 0; i < c->bus.nslots; i++) {
      buzz_sub *sub = c->bus.slots[i];
      if (sub == NULL) continue;
      lua_rawgeti(L, -1, sub->data_ref);
      if (lua_istable(L, -1)) {
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "is_active");
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  n = buzz__bus_close(&c->bus, NULL);  /* U is dropped whole below */
  buzz__loop_close(c->loop);
  c->loop = NULL;
  lua_newtable(L);
  buzz_setuv(L, 1);
  lua_pushinteger(L, (lua_Integer)n);
  return 1;
}

static int lcore_gc(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  lcore_close(L);
  free(c->cur);
  c->cur = NULL;
  c->ncur = c->capcur = 0;
  return 0;
}

static int lcore_is_closed(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  lua_pushboolean(L, !c->is_open);
  return 1;
}

/*
** core:subscribe(pattern, subobj, handler, is_once) -> id | nil, err, code.
** subobj is what next() and the reporter hand back; handler is called.
*/
static int lcore_subscribe(lua_State *L) {
  lcore *c = check_core(L);
  size_t len;
  const char *pat = luaL_checklstring(L, 2, &len);
  int is_once = lua_toboolean(L, 5), u, ref, fn_ref, rc;
  buzz_sub *sub;
  luaL_checkany(L, 3);
  luaL_checkany(L, 4);
  if (subject_usage(L, "pattern", pat, len, 1, 1)) return 3;
  u = push_refs(L);
  lua_pushvalue(L, 3);
  ref = luaL_ref(L, u);
  lua_pushvalue(L, 4);
  fn_ref = luaL_ref(L, u);
  if ((rc = buzz__bus_subscribe(&c->bus, pat, len, is_once, ref, &sub)) < 0) {
    luaL_unref(L, u, ref);
    luaL_unref(L, u, fn_ref);
    return push_fail(L, rc, NULL);
  }
  sub->fn_ref = fn_ref;
  lua_pushinteger(L, (lua_Integer)sub->slot + 1);
  return 1;
}

/*
** core:unsubscribe(id, subobj) -> true if it was live. subobj guards
** against a stale id whose slot has been reused.
*/
static int lcore_unsubscribe(lua_State *L) {
  lcore *c = check_core(L);
  buzz_sub *sub = buzz__bus_sub(&c->bus, luaL_checkinteger(L, 2));
  int u, ref, fn_ref;
  if (sub == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  u = push_refs(L);
  lua_rawgeti(L, u, sub->data_ref);
  if (!lua_rawequal(L, -1, 3)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  ref = sub->data_ref;
  fn_ref = sub->fn_ref;
  sub->data_ref = sub->fn_ref = BUZZ_NOREF;
  buzz__bus_unsubscribe(&c->bus, sub);   /* may free sub */
  luaL_unref(L, u, ref);
  luaL_unref(L, u, fn_ref);
  lua_pushboolean(L, 1);
  return 1;
}

/*
** Shared by publish, publish_sync and publish_cursor. Arguments: self,
** type, payload, priority (0..3), key, correlation_id, causation_id,
** headers. Inside a handler, a nil correlation_id is inherited from the
** current event and a nil causation_id is the current event's id.
** mode 0 queues and returns id; mode 1 delivers at once and returns id;
** mode 2 (for tests and drivers) opens a sync cursor without delivering
** and returns id, level (level nil when nobody listens).
*/
static int do_publish(lua_State *L, int mode) {
  lcore *c = check_core(L);
  size_t len, level = 0;
  const char *type = lua_type(L, 2) == LUA_TSTRING
                     ? lua_tolstring(L, 2, &len) : NULL;
  lua_Integer prio = luaL_optinteger(L, 4, BUZZ_PRIO_NORMAL);
  lua_Integer caus = luaL_optinteger(L, 7, 0);
  buzz_event *ev, *cur = c->ncur > 0 ? c->cur[c->ncur - 1] : NULL;
  int64_t id;
  lctx ctx;
  int rc;
  if (type == NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "bad type: expected a string such as "
                    "\"task.start\", got %s", luaL_typename(L, 2));
    lua_pushliteral(L, "ESUBJECT");
    return 3;
  }
  if (subject_usage(L, "type", type, len, 0, 0)) return 3;
  luaL_argcheck(L, prio >= 0 && prio < BUZZ_NPRIO, 4, "priority out of range");
  if ((ev = buzz__event_new(&c->bus.queue)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  ev->priority = (unsigned char)prio;
  ev->causation_id = caus == 0 && cur ? cur->id : (int64_t)caus;
  ctx.L = L;
  ctx.u = 0;
  rc = buzz__bus_publish(&c->bus, ev, type, len, mode != 0, &level);
  if (rc < 0) {
    buzz__event_free(&c->bus.queue, ev);
    if (rc == BUZZ_EFULL) {
      lua_pushnil(L);
      lua_pushfstring(L, "EFULL: queue is full (%d pending events); drain "
                      "the bus or raise queue_limit",
                      (int)buzz__bus_pending(&c->bus));
      lua_pushliteral(L, "EFULL");
      return 3;
    }
    return push_fail(L, rc, NULL);
  }
  if (rc == 0) {                       /* no audience: freed already */
    lua_pushinteger(L, (lua_Integer)c->bus.last_id);
    return 1;
  }
  id = ev->id;
  ctx.u = push_refs(L);
  if (mode != 1) {                     /* values wait in U until delivery */
    ev->payload_ref = ref_opt(L, ctx.u, 3);
    ev->key_ref = ref_opt(L, ctx.u, 5);
    ev->headers_ref = ref_opt(L, ctx.u, 8);
    ev->corr_ref = ref_opt(L, ctx.u, 6);
  }
  if (lua_isnoneornil(L, 6) && cur && cur->table_ref != BUZZ_NOREF) {
    lua_rawgeti(L, ctx.u, cur->table_ref);     /* inherit correlation */
    lua_pushvalue(L, UV(UV_CORR));
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1)) ev->corr_ref = luaL_ref(L, ctx.u);
    lua_settop(L, ctx.u);
  }
  if (mode == 1) {                     /* build the table from the args */
    push_event(L, ctx.u, ev, 1);
    lua_pop(L, 1);
  }
  if (mode == 0) {
    buzz__loop_signal(c->loop, 1);
  } else if (mode == 1) {
    buzz_sub *sub;
    buzz_event *e;
    while (c->is_open &&
           buzz__bus_next(&c->bus, level, &sub, &e, &ctx) > 0)
      dispatch(L, c, ctx.u, sub, e);
  } else {
    lua_pushinteger(L, (lua_Integer)id);
    lua_pushinteger(L, (lua_Integer)level);
    return 2;
  }
  lua_pushinteger(L, (lua_Integer)id);
  return 1;
}

static int lcore_publish(lua_State *L) {
  return do_publish(L, 0);
}

static int lcore_publish_sync(lua_State *L) {
  return do_publish(L, 1);
}

static int lcore_publish_cursor(lua_State *L) {
  return do_publish(L, 2);
}

/*
** core:pump(max) -> deliveries made (max < 0: no limit), or nil,
** "EINHANDLER" when called from inside a handler. Runs queued deliveries
** until the queue is empty, stop() is called or the core is closed.
*/
static int lcore_pump(lua_State *L) {
  lcore *c = check_core(L);
  lua_Integer max = luaL_checkinteger(L, 2), n = 0;
  buzz_sub *sub;
  buzz_event *ev;
  lctx ctx;
  if (c->ncur > 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "EINHANDLER");
    return 2;
  }
  ctx.L = L;
  ctx.u = push_refs(L);
  while ((max < 0 || n < max) && c->is_open && !c->is_stopped &&
         buzz__bus_next(&c->bus, 0, &sub, &ev, &ctx) > 0) {
    dispatch(L, c, ctx.u, sub, ev);
    n++;
  }
  if (c->is_open)
    buzz__loop_signal(c->loop, buzz__bus_pending(&c->bus) > 0);
  lua_pushinteger(L, n);
  return 1;
}

/* core:stop(flag): pump() returns while the flag is set. */
static int lcore_stop(lua_State *L) {
  lcore *c = check_core(L);
  c->is_stopped = lua_toboolean(L, 2);
  return 0;
}

static int lcore_is_stopped(lua_State *L) {
  lcore *c = check_core(L);
  lua_pushboolean(L, c->is_stopped);
  return 1;
}

/* core:subs() -> array of the live subscription objects, in order */
static int lcore_subs(lua_State *L) {
  lcore *c = check_core(L);
  int u = push_refs(L), n = 0;
  size_t i;
  lua_createtable(L, (int)c->bus.nsubs, 0);
  for (i = 0; i < c->bus.nslots; i++) {
    buzz_sub *sub = c->bus.slots[i];
    if (sub == NULL) continue;
    lua_rawgeti(L, u, sub->data_ref);
    lua_rawseti(L, -2, ++n);
  }
  return 1;
}

/*
** core:next(level) -> subobj, event | nothing. Hands out the next delivery
** at a level (0 = the queue, k = the k-th nested publish_sync).
*/
static int lcore_next(lua_State *L) {
  lcore *c = check_core(L);
  lua_Integer level = luaL_optinteger(L, 2, 0);
  buzz_sub *sub;
  buzz_event *ev;
  lctx ctx;
  int rc;
  luaL_argcheck(L, level >= 0, 2, "level must be >= 0");
  ctx.L = L;
  ctx.u = push_refs(L);
  rc = buzz__bus_next(&c->bus, (size_t)level, &sub, &ev, &ctx);
  if (rc == 0) {
    if (level == 0) buzz__loop_signal(c->loop, 0);
    return 0;
  }
  if (rc < 0) return push_fail(L, rc, NULL);
  lua_rawgeti(L, ctx.u, sub->data_ref);
  if (sub->is_once) once_ended(L, ctx.u, sub, lua_gettop(L));
  push_event(L, ctx.u, ev, 0);
  return 2;
}

static int lcore_pending(lua_State *L) {
  lcore *c = check_core(L);
  lua_pushinteger(L, (lua_Integer)buzz__bus_pending(&c->bus));
  return 1;
}

/* core:timeout() -> ms until work is due: 0 now, -1 never (nothing armed) */
static int lcore_timeout(lua_State *L) {
  lcore *c = check_core(L);
  if (buzz__bus_pending(&c->bus) > 0) lua_pushinteger(L, 0);
  else lua_pushinteger(L, buzz__loop_timeout(c->loop));
  return 1;
}

/* core:fd() -> the descriptor a host polls; readable while work is due. */
static int lcore_fd(lua_State *L) {
  lcore *c = check_core(L);
  lua_pushinteger(L, buzz__loop_fd(c->loop));
  buzz__loop_signal(c->loop, buzz__bus_pending(&c->bus) > 0);
  return 1;
}

/* core:wait() -> true after one round of loop activity, false if none can
** come (nothing pending, nothing armed). */
static int lcore_wait(lua_State *L) {
  lcore *c = check_core(L);
  if (buzz__bus_pending(&c->bus) > 0) lua_pushboolean(L, 1);
  else lua_pushboolean(L, buzz__loop_wait(c->loop));
  return 1;
}

/* core:audience(type) -> array of the subobjs a publish would reach now */
static int lcore_audience(lua_State *L) {
  lcore *c = check_core(L);
  size_t len, i, n = 0;
  const char *type = luaL_checklstring(L, 2, &len);
  buzz_subject *s;
  buzz_matchvec *v;
  int u, rc;
  if (subject_usage(L, "type", type, len, 0, 1)) return 3;
  if ((s = buzz__trie_subject(c->bus.trie, type, len)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  rc = buzz__trie_match(c->bus.trie, s, &v);
  buzz__subject_release(s);
  if (rc < 0) return push_fail(L, rc, NULL);
  u = push_refs(L);
  lua_createtable(L, (int)v->n, 0);
  for (i = 0; i < v->n; i++) {
    if (v->subs[i]->is_dead) continue;
    lua_rawgeti(L, u, v->subs[i]->data_ref);
    lua_rawseti(L, -2, (int)++n);
  }
  return 1;
}

static int lcore_stats(lua_State *L) {
  lcore *c = check_core(L);
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, (lua_Integer)buzz__bus_pending(&c->bus));
  lua_setfield(L, -2, "pending");
  lua_pushinteger(L, (lua_Integer)c->bus.nsubs);
  lua_setfield(L, -2, "subscriptions");
  lua_pushinteger(L, (lua_Integer)c->bus.last_id);
  lua_setfield(L, -2, "last_id");
  lua_pushinteger(L, (lua_Integer)buzz__trie_cached(c->bus.trie));
  lua_setfield(L, -2, "cached_types");
  lua_pushinteger(L, (lua_Integer)c->bus.queue.limit);
  lua_setfield(L, -2, "queue_limit");
  return 1;
}

static int lcore_tostring(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  lua_pushfstring(L, "buzz.core (%s)", c->is_open ? "open" : "closed");
  return 1;
}


/* ------------------------------------------------------------ module */

/*
** core.check_subject(s, is_pattern) -> true | false, message. The message
** is the one subscribe and publish raise ('bad pattern "a..b": ...');
** reserved '$' types count as valid here.
*/
static int l_check_subject(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int is_pattern = lua_toboolean(L, 2);
  if (!subject_usage(L, is_pattern ? "pattern" : "type", s, len,
                     is_pattern, 1)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pop(L, 1);                       /* nil, message, code -> */
  lua_pushboolean(L, 0);               /* false, message */
  lua_replace(L, -3);
  return 2;
}

/* core.now_ms() -> the clock the core stamps events with */
static int l_now_ms(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)buzz__clock_ms());
  return 1;
}

static const luaL_Reg core_methods[] = {
  { "subscribe", lcore_subscribe },
  { "unsubscribe", lcore_unsubscribe },
  { "publish", lcore_publish },
  { "publish_sync", lcore_publish_sync },
  { "publish_cursor", lcore_publish_cursor },
  { "pump", lcore_pump },
  { "stop", lcore_stop },
  { "is_stopped", lcore_is_stopped },
  { "subs", lcore_subs },
  { "next", lcore_next },
  { "pending", lcore_pending },
  { "timeout", lcore_timeout },
  { "fd", lcore_fd },
  { "wait", lcore_wait },
  { "audience", lcore_audience },
  { "stats", lcore_stats },
  { "close", lcore_close },
  { "is_closed", lcore_is_closed },
  { NULL, NULL }
};

static const luaL_Reg module_funcs[] = {
  { "new", lcore_new },
  { "check_subject", l_check_subject },
  { "now_ms", l_now_ms },
  { NULL, NULL }
};

#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
int luaopen_buzz_core(lua_State *L);

int luaopen_buzz_core(lua_State *L) {
  if (luaL_newmetatable(L, CORE_MT)) {
    lua_pushliteral(L, CORE_MT);       /* LuaJIT does not set __name */
    lua_setfield(L, -2, "__name");
    size_t i;
    lua_newtable(L);
    lua_pushvalue(L, -2);              /* UV_MT: methods check against it */
    for (i = 0; i < sizeof uv_strings / sizeof uv_strings[0]; i++)
      lua_pushstring(L, uv_strings[i]);
    luaL_setfuncs(L, core_methods, UV_COUNT);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, lcore_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, lcore_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, lcore_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_setfuncs(L, module_funcs, 0);
  lua_pushliteral(L, "0.1.0");
  lua_setfield(L, -2, "version");
  return 1;
}
