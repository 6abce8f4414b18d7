/*
** lhot.c: the core's side of the hot path of a memory bus
** (lua/buzz/hot.lua). The Lua layer keeps each type's audience
** (core:audience) and builds the event table itself; the core still hands
** out ids and keeps the current-event stack and the publish_sync depth,
** so that publishes made on either path agree on all three. Nothing here
** calls into Lua except the resume of the hot path's own thread.
**
** core:stamp(is_sync, ts) -> id, ts, causation_id, correlation_id | nil,
** "EDEPTH: ...", "EDEPTH". Takes the next id (as a publish with an
** audience or without one would), stamps ts (ms; nil: the core's clock)
** and returns what a publish made now inherits (nil when nothing): the
** current event's id and correlation_id. With is_sync, refuses as
** publish_sync does past SYNC_MAX levels, taking no id. A bus with a
** store publishes through core:publish (its ids come from a
** reservation): stamp raises there.
*/
#include "lcore.h"
#include "lcheck.h"

#define check_core buzz__lcore_check
#define push_refs buzz__lcore_refs
#define push_fail buzz__lcore_fail
#define unref buzz__lcore_unref
#define cur_push buzz__lcore_cur_push
#define push_correlation buzz__lcore_correlation
#define push_too_deep buzz__lcore_too_deep

int buzz__lhot_stamp(lua_State *L) {
  lcore *c = check_core(L);
  int64_t ts = buzz__opt_int(L, 3, "ts", 0, 0, BUZZ_INT_EXACT);
  if (c->store != NULL)
    return luaL_error(L, "core:stamp() is for a memory bus; a store's "
                      "events go through core:publish()");
  if (lua_toboolean(L, 2) && c->nsync >= SYNC_MAX)
    return push_too_deep(L, c);
  if (c->bus.last_id >= BUZZ_INT_EXACT)
    return push_fail(L, BUZZ_EINVAL, "no ids left");
  lua_pushinteger(L, (lua_Integer)++c->bus.last_id);
  lua_pushinteger(L, (lua_Integer)(ts > 0 ? ts : buzz__clock_ms()));
  if (c->ncur == 0) return 2;
  {
    lcur cur = c->cur[c->ncur - 1];
    if (cur.id != 0) lua_pushinteger(L, (lua_Integer)cur.id);
    else lua_pushnil(L);
    if (cur.table_ref == BUZZ_NOREF) return 3;
    push_correlation(L, push_refs(L), cur.table_ref);
    lua_remove(L, -2);                 /* U */
    return 4;
  }
}

/*
** core:sync(co, ev, aud, ts) -> id, ok, ... | nil, "EDEPTH: ...",
** "EDEPTH". publish_sync's hot path in one call: refuses past SYNC_MAX
** nested levels (taking no id), takes the next id, and sets ev.id, ev.ts
** (ts, or the core's clock when ts is nil or false) and what ev inherits from the current event
** (correlation_id unless ev has one, causation_id), then resumes co (a
** suspended thread of the hot path's pool) with ev and aud while ev is
** the current event, as one publish_sync level. Returns the id, then
** what core:deliver returns for the resume. The constructor in
** lua/buzz/hot.lua sizes ev so that setting these fields never rehashes.
*/
int buzz__lhot_sync(lua_State *L) {
  lcore *c = check_core(L);
  lua_State *co = lua_tothread(L, 2);
  int64_t ts = lua_toboolean(L, 5)     /* false: no manual clock */
               ? buzz__opt_int(L, 5, "ts", 0, 0, BUZZ_INT_EXACT) : 0, id;
  int u, rc, nres = 0;
  size_t level;
  lcur *cur;
  luaL_argcheck(L, co != NULL && co != L && lua_status(co) == LUA_YIELD, 2,
                "expected a suspended thread");
  luaL_checktype(L, 3, LUA_TTABLE);
  if (!lua_checkstack(co, 2)) return luaL_error(L, "stack overflow");
  if (c->store != NULL)
    return luaL_error(L, "core:sync() is for a memory bus; a store's "
                      "events go through core:publish_sync()");
  if (c->nsync >= SYNC_MAX) return push_too_deep(L, c);
  if (c->bus.last_id >= BUZZ_INT_EXACT)
    return push_fail(L, BUZZ_EINVAL, "no ids left");
  lua_settop(L, 4);
  u = push_refs(L);                    /* slot 5 */
  id = ++c->bus.last_id;
  lua_pushvalue(L, UV(UV_ID));
  lua_pushinteger(L, (lua_Integer)id);
  lua_rawset(L, 3);
  lua_pushvalue(L, UV(UV_TS));
  lua_pushinteger(L, (lua_Integer)(ts > 0 ? ts : buzz__clock_ms()));
  lua_rawset(L, 3);
  if (c->ncur > 0) {                   /* inside a handler: inherit */
    lcur top = c->cur[c->ncur - 1];
    if (top.id != 0) {
      lua_pushvalue(L, UV(UV_CAUS));
      lua_pushinteger(L, (lua_Integer)top.id);
      lua_rawset(L, 3);
    }
    if (top.table_ref != BUZZ_NOREF) {
      lua_pushvalue(L, UV(UV_CORR));
      lua_rawget(L, 3);
      if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushvalue(L, UV(UV_CORR));
        push_correlation(L, u, top.table_ref);
        lua_rawset(L, 3);
      } else {
        lua_pop(L, 1);
      }
    }
  }
  if (!cur_push(c, id, BUZZ_NOREF))
    return luaL_error(L, "not enough memory");
  level = c->ncur - 1;
  cur = &c->cur[level];
  lua_pushvalue(L, 3);
  if (cur->slot == LUA_NOREF) cur->slot = luaL_ref(L, u);
  else lua_rawseti(L, u, cur->slot);
  cur->table_ref = cur->slot;
  lua_pushinteger(L, (lua_Integer)id); /* slot 6: the result */
  lua_pushvalue(L, 3);
  lua_pushvalue(L, 4);
  lua_xmove(L, co, 2);
  c->nsync++;
#if LUA_VERSION_NUM >= 504
  rc = lua_resume(co, NULL, 2, &nres);
#else
  rc = buzz_resume_n(co, L, 2, &nres);
#endif
  c->nsync--;
  c->ncur = level;                     /* nested levels are gone */
  if (c->is_open) {                    /* else U went with close() */
    lua_pushboolean(L, 0);             /* keep the slot a non-nil */
    lua_rawseti(L, u, c->cur[level].slot);  /* value: see luaL_ref */
  }
  return 1 + buzz__lcore_resumed(L, co, rc, nres);  /* after the id */
}

/*
** core:deliver(co, ev, is_sync, ...) -> true, ... | false, err. Resumes co
** (a thread of the hot path's pool) with the arguments after is_sync
** while the table ev
** (with an integer id) is the current event, as dispatch() does for the
** core's own deliveries: publishes inside inherit from it. With is_sync
** the resume counts as a publish_sync level (EDEPTH). On Lua 5.4 each
** resume starts a fresh budget of C calls, as in dispatch(). Returns as
** coroutine.resume does; never raises for co's sake.
*/
int buzz__lhot_deliver(lua_State *L) {
  lcore *c = check_core(L);
  lua_State *co;
  int u, rc, nres = 0, is_sync, ref, nargs;
  int64_t id = 0;
  size_t level;
  co = lua_tothread(L, 2);
  luaL_argcheck(L, co != NULL, 2, "expected a thread");
  luaL_checktype(L, 3, LUA_TTABLE);
  is_sync = lua_toboolean(L, 4);
  nargs = lua_gettop(L) > 4 ? lua_gettop(L) - 4 : 0;
  if (co == L || (lua_status(co) == LUA_OK && lua_gettop(co) == 0) ||
      !lua_checkstack(co, nargs)) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "cannot resume dead coroutine");
    return 2;
  }
  lua_xmove(L, co, nargs);             /* the arguments */
  lua_settop(L, 3);
  u = push_refs(L);                    /* slot 4 */
  lua_pushvalue(L, UV(UV_ID));
  lua_rawget(L, 3);
  if (!buzz__to_int(L, -1, 0, INT64_MAX, &id)) id = 0;
  lua_pop(L, 1);
  lua_pushvalue(L, 3);
  ref = luaL_ref(L, u);                /* released below */
  if (!cur_push(c, id, ref)) {
    unref(L, u, &ref);
    return luaL_error(L, "not enough memory");
  }
  level = c->ncur - 1;
  if (is_sync) c->nsync++;
#if LUA_VERSION_NUM >= 504
  rc = lua_resume(co, NULL, nargs, &nres);
#else
  rc = buzz_resume_n(co, L, nargs, &nres);
#endif
  if (is_sync) c->nsync--;
  c->ncur = level;                     /* nested levels are gone */
  unref(L, u, &ref);
  return buzz__lcore_resumed(L, co, rc, nres);
}
