/*
** lpublish.c: publishing on the core object: core:publish (queues the
** event), core:publish_sync (opens a sync level the Lua layer takes with
** core:take) and core:current (the event a publish made now inherits
** from). The binding's part of the pipeline: it reads and checks the
** arguments, inherits from the current event, encodes the JSON and
** fills the row's strings (store_publish), keeps the event's values as
** refs, sets preempt and pushes the results; engine.c runs the steps in
** plain C (the dedup check, the id reservation, the append, the queue,
** the commit gate). A binding file: luaopen_buzz_core in lbuzz.c
** registers buzz__lpublish_methods with the core's upvalues (lcore.h);
** lhot.c's core:sync_id shares the count of publish_sync levels
** (buzz__lcore_sync_levels) and the EDEPTH message (buzz__lcore_too_deep).
**
** Invariants: a publish inside a handler inherits the correlation id of
** the current event (U[cur_slot]) and takes its id as the causation id;
** the engine's (engine.c's head) hold: an appended id is used up, a
** dedup key is recorded only once its event is published. Queued events
** keep their values in U until delivery (refs released by on_event_free
** in lbuzz.c).
**
** It does not deliver (ldispatch.c and the Lua layer do), does not take
** the writer's news or reserve ids itself (engine.c does), and builds an
** event table only for publish_sync (lbuzz.c's push_event).
*/
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "buzz.h"
#include "json.h"
#include "lcheck.h"
#include "lcore.h"

#define check_core buzz__lcore_check_fast   /* see lcore.h's short names */
#define S_CUR 17           /* do_publish's slot of the current event */

static int ref_opt(lua_State *L, int u, int idx) {
  if (lua_isnoneornil(L, idx)) return BUZZ_NOREF;
  lua_pushvalue(L, idx);
  return luaL_ref(L, u);
}

/* Gives an event record back: to the spare list, or to free() once the
** bus is closed (its spare list is gone). */
static void event_drop(lcore *c, buzz_event *ev) {
  if (c->is_open && !c->eng.bus.is_closed)
    buzz__event_free(&c->eng.bus.queue, ev);
  else free(ev);
}

/*
** With a store: takes the writer's news and reserves the id (engine.c),
** encodes the payload (slot 3) and headers (slot 8), and appends the row
** (buzz__engine_append, which presets ev's id and ts and, for sync
** durability or a publish_sync, waits for its commit). Returns 0, or
** pushes nil, err, code (EINVAL/ETOOBIG for a payload JSON cannot hold,
** which the Lua layer raises; ESTORE for the world) and returns 3.
** Stack: U at u.
*/
static int store_publish(lua_State *L, lcore *c, int u, buzz_event *ev,
                         int is_sync, const char *type, size_t len,
                         const char *dkey, size_t dlen) {
  buzz_row spec;
  char err[ERR_MAX];
  lctx x;
  int rc, top = lua_gettop(L);
  x.L = L;
  x.u = u;
  x.c = c;
  memset(&spec, 0, sizeof spec);
  if ((rc = buzz__engine_begin(&c->eng, &x, err)) < 0)
    return push_store_fail(L, rc, err);
  if ((rc = buzz__json_encode(L, 3, "payload", c->max_payload)) != 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    lua_pushstring(L, buzz__err_name(rc));
    return 3;
  }
  spec.payload.p = lua_tolstring(L, -1, &spec.payload.n);
  if (!lua_isnil(L, 8)) {
    if ((rc = buzz__json_encode(L, 8, "headers", 0)) != 0) {
      lua_pushnil(L);
      lua_insert(L, -2);
      lua_pushstring(L, buzz__err_name(rc));
      return 3;
    }
    spec.headers.p = lua_tolstring(L, -1, &spec.headers.n);
  }
  spec.type.p = type;
  spec.type.n = len;
  if (lua_type(L, 5) == LUA_TNUMBER) {
    spec.is_key_int = 1;
    spec.key_int = (int64_t)lua_tointeger(L, 5);
  } else if (lua_type(L, 5) == LUA_TSTRING) {
    spec.key.p = lua_tolstring(L, 5, &spec.key.n);
  }
  if (lua_type(L, 6) == LUA_TSTRING)
    spec.corr.p = lua_tolstring(L, 6, &spec.corr.n);
  spec.dedup.p = dkey;
  spec.dedup.n = dlen;
  if (ev->stream_version != 0)
    spec.stream.p = lua_tolstring(L, 13, &spec.stream.n);
  rc = buzz__engine_append(&c->eng, &spec, ev, is_sync, &x, err);
  lua_settop(L, top);                  /* the JSON is copied in the row */
  if (rc < 0) return push_store_fail(L, rc, err);
  if (rc > 0)                          /* another group's failure: kept */
    report_store(L, c, u, err);        /* for Lua to report */
  return 0;
}

/*
** Pushes the current event (U[cur_slot]: lua/buzz/task.lua, hot.lua
** and core:resume set it while a handler runs), or false when there is
** none (never nil: luaL_ref would reuse the slot). Stack: U at u.
*/
static void push_current(lua_State *L, lcore *c, int u) {
  lua_rawgeti(L, u, c->cur_slot);
}

/* The integer id (read raw) of the event table at idx, or 0. */
static int64_t event_id(lua_State *L, int idx) {
  int64_t id = 0;
  if (!lua_istable(L, idx)) return 0;
  lua_pushvalue(L, UV(UV_ID));
  lua_rawget(L, idx < 0 ? idx - 1 : idx);
  if (!buzz__to_int(L, -1, 0, INT64_MAX, &id)) id = 0;
  lua_pop(L, 1);
  return id;
}

/* Pushes the correlation_id (read raw) of the table at idx, or nil. */
static void push_correlation(lua_State *L, int idx) {
  if (!lua_istable(L, idx)) {
    lua_pushnil(L);
    return;
  }
  lua_pushvalue(L, UV(UV_CORR));
  lua_rawget(L, idx < 0 ? idx - 1 : idx);
}

/* The publish_sync levels open: the core's and the hot path's. */
int buzz__lcore_sync_levels(lua_State *L, lcore *c) {
  int u = push_refs(L);
  lua_Integer hot;
  lua_rawgeti(L, u, c->depth_slot);
  hot = lua_tointeger(L, -1);
  lua_pop(L, 2);
  if (hot < 0 || hot > SYNC_MAX) hot = SYNC_MAX;
  return c->nsync + (int)hot;
}

/* Pushes nil, "EDEPTH: ...", "EDEPTH": publish_sync nested too deep, with
** levels open. */
int buzz__lcore_too_deep(lua_State *L, int levels) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: publish_sync nested %d deep: a handler run by "
                  "publish_sync may publish_sync again at most %d levels "
                  "deep; nothing was published (use publish to queue the "
                  "event)", buzz__err_name(BUZZ_EDEPTH), levels + 1,
                  SYNC_MAX);
  lua_pushstring(L, buzz__err_name(BUZZ_EDEPTH));
  return 3;
}

/*
** Shared by publish and publish_sync. Arguments: self,
** type, payload, priority (0..3), key, correlation_id, causation_id,
** headers, dedup, version, engine, ts (ms; 0 or nil: the core's clock,
** else the time to stamp, as a manual clock gives it), stream and
** stream_version (both or neither: the Lua layer checked the stream's
** expected version and gives the next one; stream.lua), and conflict:
** the ECONFLICT message when the check failed and a dedup key was given,
** returned unless the key makes the publish a duplicate (a retried
** publish whose first try got in). Inside a handler
** (or a thread run by resume() with an event), a nil correlation_id is
** inherited from the
** current event and a nil causation_id is the current event's id. A dedup
** key seen within the window (by ts when given: a manual clock's windows
** move with it) returns the first id and "duplicate", and publishes
** nothing. Numbers out of their range (a key beyond +-2^53, a version
** beyond INT_MAX, ...) raise. mode 1 nested SYNC_MAX deep returns nil,
** "EDEPTH: ...", "EDEPTH" and publishes nothing. With engine true, reserved types ("$DLQ.x", "$SYS.x")
** are accepted: the Lua layer publishes its own events so.
** mode 0 queues and returns id (an event more urgent than the last one
** a take handed out sets preempt on that take's subs array: see take);
** mode 1 (publish_sync) opens a sync cursor and returns id, level
** (level nil when nobody listens): the caller takes its deliveries with
** core:take (ldispatch.c), whose take finding none closes the level.
*/
static int do_publish(lua_State *L, int mode) {
  lcore *c = check_core(L);
  size_t len, level = 0, dlen = 0;
  const char *type = lua_type(L, 2) == LUA_TSTRING
                     ? lua_tolstring(L, 2, &len) : NULL;
  int64_t prio = buzz__opt_int(L, 4, "priority", BUZZ_PRIO_NORMAL, 0,
                               BUZZ_NPRIO - 1);
  int64_t caus = buzz__opt_int(L, 7, "causation_id", 0, 0, INT64_MAX);
  const char *dkey = luaL_optlstring(L, 9, NULL, &dlen);
  int64_t version = buzz__opt_int(L, 10, "version", 0, 0, INT_MAX);
  int is_engine = lua_toboolean(L, 11), levels;
  int64_t ts = buzz__opt_int(L, 12, "ts", 0, 0, BUZZ_INT_EXACT);
  int has_stream = !lua_isnoneornil(L, 13);
  int64_t sversion = 0;
  buzz_event *ev;
  int64_t id, now = 0;
  lctx ctx;
  int rc;
  if (type == NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "bad type: expected a string such as "
                    "\"task.start\", got %s", luaL_typename(L, 2));
    lua_pushliteral(L, "ESUBJECT");
    return 3;
  }
  if (subject_usage(L, "type", type, len, 0, is_engine)) return 3;
  if (lua_type(L, 5) == LUA_TNUMBER)   /* an integer key JSON holds */
    buzz__check_int(L, 5, "key", -BUZZ_INT_EXACT, BUZZ_INT_EXACT);
  if (has_stream) {                    /* the Lua layer checked expect */
    luaL_checktype(L, 13, LUA_TSTRING);
    sversion = buzz__check_int(L, 14, "stream_version", 1, BUZZ_INT_EXACT);
  }
  if (mode == 1 && (levels = sync_levels(L, c)) >= SYNC_MAX)
    return push_too_deep(L, levels);
  lua_settop(L, 15);
  ctx.L = L;
  ctx.c = c;
  ctx.u = push_refs(L);                /* slot 16 */
  push_current(L, c, ctx.u);           /* S_CUR: inherited from */
  if (dkey) now = ts > 0 ? ts : buzz__clock_ms();  /* the bus's clock */
  if (dkey && (id = buzz__engine_duplicate(&c->eng, dkey, dlen, now)) != 0) {
    lua_pushinteger(L, (lua_Integer)id);
    lua_pushliteral(L, "duplicate");
    return 2;
  }
  if (lua_type(L, 15) == LUA_TSTRING) {   /* not a repeat: the conflict */
    lua_pushnil(L);
    lua_pushvalue(L, 15);
    lua_pushstring(L, buzz__err_name(BUZZ_ECONFLICT));
    return 3;
  }
  if (lua_isnil(L, 6) && lua_istable(L, S_CUR)) {
    push_correlation(L, S_CUR);        /* inherit it */
    lua_replace(L, 6);
  }
  if (mode == 0 && buzz__engine_is_full(&c->eng))    /* before the append */
    goto full;
  if ((ev = buzz__event_new(&c->eng.bus.queue)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  ev->priority = (unsigned char)prio;
  ev->causation_id = caus == 0 ? event_id(L, S_CUR) : (int64_t)caus;
  ev->version = (int)version;
  ev->stream_version = sversion;
  if (ts > 0) ev->ts = (int64_t)ts;    /* a manual clock's time */
  if (c->eng.store &&
      store_publish(L, c, ctx.u, ev, mode == 1, type, len, dkey, dlen)) {
    event_drop(c, ev);
    return 3;
  }
  rc = buzz__engine_queue(&c->eng, ev, type, len, mode != 0, &level);
  if (rc < 0) {
    event_drop(c, ev);
    if (rc == BUZZ_EFULL) goto full;
    return push_fail(L, rc, NULL);
  }
  id = c->eng.bus.last_id;
  BUZZ_METRIC(c->published[prio]++);
  if (dkey && buzz__engine_remember(&c->eng, dkey, dlen, id, now) < 0)
    return push_fail(L, BUZZ_ENOMEM, NULL);     /* rc is still the bus's */
  if (rc == 0) {                       /* no audience: freed already */
    lua_pushinteger(L, (lua_Integer)id);
    return 1;
  }
  buzz__engine_gate(&c->eng, mode != 0, id);  /* delivered once committed */
  if (mode != 1) {                     /* values wait in U until delivery */
    ev->payload_ref = ref_opt(L, ctx.u, 3);
    ev->key_ref = ref_opt(L, ctx.u, 5);
    ev->headers_ref = ref_opt(L, ctx.u, 8);
    ev->corr_ref = ref_opt(L, ctx.u, 6);
    if (has_stream) ev->stream_ref = ref_opt(L, ctx.u, 13);
  }
  if (mode == 1) {                     /* build the table from the args */
    push_event(L, c, ctx.u, ev, 1);
    lua_pop(L, 1);
  }
  if (mode == 0) {
    buzz__loop_signal(c->loop, 1);
    if ((int)prio < c->batch_prio) {   /* it overtakes what a take handed */
      lua_rawgeti(L, ctx.u, c->batch_ref);   /* out and did not run yet */
      lua_pushinteger(L, (lua_Integer)prio);
      lua_setfield(L, -2, "preempt");
      lua_pop(L, 1);
      c->batch_prio = (int)prio;
    }
  } else {                             /* the caller takes the level */
    c->nsync++;                        /* take() closes it */
    lua_pushinteger(L, (lua_Integer)id);
    lua_pushinteger(L, (lua_Integer)level);
    return 2;
  }
  lua_pushinteger(L, (lua_Integer)id);
  return 1;
full:
  BUZZ_METRIC(c->refused_full++);
  lua_pushnil(L);
  {                                    /* a count: no (int) cut */
    char num[24];
    snprintf(num, sizeof num, "%zu", buzz__bus_pending(&c->eng.bus));
    lua_pushfstring(L, "%s: queue is full (%s pending events); drain "
                    "the bus or raise queue_limit",
                    buzz__err_name(BUZZ_EFULL), num);
  }
  lua_pushstring(L, buzz__err_name(BUZZ_EFULL));
  return 3;
}

static int lcore_publish(lua_State *L) {
  return do_publish(L, 0);
}

static int lcore_publish_sync(lua_State *L) {
  return do_publish(L, 1);
}


/*
** core:current() -> id, correlation_id of the innermost current event (the
** one a publish made now would inherit from), or nothing outside every
** handler. For the Lua layer's own later publishes (delayed events).
*/
static int lcore_current(lua_State *L) {
  lcore *c = check_core(L);
  int64_t id;
  push_current(L, c, push_refs(L));
  if (!lua_istable(L, -1)) return 0;
  id = event_id(L, -1);
  if (id != 0) lua_pushinteger(L, (lua_Integer)id);
  else lua_pushnil(L);
  push_correlation(L, -2);
  return 2;
}

/* The methods of this file; luaopen_buzz_core (lbuzz.c) adds them to the
** core's with the upvalues of lcore.h. */
const luaL_Reg buzz__lpublish_methods[] = {
  { "publish", lcore_publish },
  { "publish_sync", lcore_publish_sync },
  { "current", lcore_current },
  { NULL, NULL }
};
