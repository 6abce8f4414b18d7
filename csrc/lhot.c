/*
** lhot.c: the core's side of the hot path of a memory bus
** (lua/buzz/hot.lua). The Lua layer keeps each type's audience
** (core:audience) and builds the event table itself; the core still hands
** out ids, sets the current event (inherited from by publishes) and
** counts the publish_sync depth, so that publishes made on either path
** agree on all three. Nothing here calls into Lua but the resume of a
** thread of the bus's pool.
*/
#include "lcore.h"
#include "lcheck.h"

#define check_core buzz__lcore_check   /* see lcore.h's short names */

/*
** core:sync(co, ev, aud, ts, fn, st) -> id, ok, done, ... | nil,
** "EDEPTH: ...", "EDEPTH". publish_sync's hot path in one call: refuses
** past SYNC_MAX nested levels (taking no id), takes the next id, and sets
** ev.id, ev.ts (ts, or the core's clock when ts is nil or false) and
** what ev inherits from the current event (correlation_id unless ev has
** one, causation_id), then starts fn(ev, aud, st) in co (an idle thread
** of the bus's pool, lua/buzz/task.lua) while ev is the current event,
** as one publish_sync level. Returns the id, then what core:resume's
** start form returns: true, true when fn returned (co is idle again);
** true, false and what it yielded; false and the error. The constructor
** in lua/buzz/hot.lua sizes ev so that setting these fields never
** rehashes.
*/
int buzz__lhot_sync(lua_State *L) {
  lcore *c = check_core(L);
  lua_State *co = lua_tothread(L, 2);
  int64_t ts = lua_toboolean(L, 5)     /* false: no manual clock */
               ? buzz__opt_int(L, 5, "ts", 0, 0, BUZZ_INT_EXACT) : 0, id;
  int u, rc, nres = 0;
  lua_Debug ar;
  luaL_argcheck(L, co != NULL && co != L && lua_status(co) == LUA_OK &&
                lua_gettop(co) == 0 && !lua_getstack(co, 0, &ar), 2,
                "expected an idle thread");
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 6, LUA_TFUNCTION);
  if (!lua_checkstack(co, 4)) return luaL_error(L, "stack overflow");
  if (c->store != NULL)
    return luaL_error(L, "core:sync() is for a memory bus; a store's "
                      "events go through core:publish_sync()");
  if (c->nsync >= SYNC_MAX) return push_too_deep(L, c);
  if (c->bus.last_id >= BUZZ_INT_EXACT)
    return push_fail(L, BUZZ_EINVAL, "no ids left");
  lua_settop(L, 7);
  u = push_refs(L);                    /* slot 8 */
  id = ++c->bus.last_id;
  lua_pushvalue(L, UV(UV_ID));
  lua_pushinteger(L, (lua_Integer)id);
  lua_rawset(L, 3);
  lua_pushvalue(L, UV(UV_TS));
  lua_pushinteger(L, (lua_Integer)(ts > 0 ? ts : buzz__clock_ms()));
  lua_rawset(L, 3);
  buzz__lcore_current(L, c, u);        /* slot 9: inherited from */
  if (lua_istable(L, 9)) {             /* inside a handler: inherit */
    int64_t caus = buzz__lcore_event_id(L, 9);
    if (caus != 0) {
      lua_pushvalue(L, UV(UV_CAUS));
      lua_pushinteger(L, (lua_Integer)caus);
      lua_rawset(L, 3);
    }
    lua_pushvalue(L, UV(UV_CORR));
    lua_rawget(L, 3);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushvalue(L, UV(UV_CORR));
      buzz__lcore_correlation(L, 9);
      lua_rawset(L, 3);
    } else {
      lua_pop(L, 1);
    }
  }
  lua_pushvalue(L, 3);                 /* ev is current while it runs */
  lua_rawseti(L, u, c->cur_slot);
  lua_pushinteger(L, (lua_Integer)id); /* slot 10: the result */
  lua_pushvalue(L, 6);                 /* fn(ev, aud, st) */
  lua_pushvalue(L, 3);
  lua_pushvalue(L, 4);
  lua_pushvalue(L, 7);
  lua_xmove(L, co, 4);
  c->nsync++;
#if LUA_VERSION_NUM >= 504
  rc = lua_resume(co, NULL, 3, &nres);
#else
  rc = buzz_resume_n(co, L, 3, &nres);
#endif
  c->nsync--;
  if (c->is_open) {                    /* else U went with close() */
    lua_pushvalue(L, 9);               /* the outer event is current */
    lua_rawseti(L, u, c->cur_slot);
  }
  if (rc == LUA_OK) {                  /* fn returned: co is idle again */
    lua_settop(co, 0);
    lua_pushboolean(L, 1);
    lua_pushboolean(L, 1);
    return 3;
  }
  if (rc != LUA_YIELD) {
    lua_pushboolean(L, 0);
    lua_xmove(co, L, 1);               /* the error value */
    return 3;
  }
  if (!lua_checkstack(L, nres + 2)) {
    lua_pop(co, nres);
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "too many results to resume");
    return 3;
  }
  lua_pushboolean(L, 1);               /* true, false, what it yielded */
  lua_pushboolean(L, 0);
  lua_xmove(co, L, nres);
  return 3 + nres;
}
