/*
** lhot.c: the core's side of the hot path of a memory bus
** (lua/buzz/hot.lua). The Lua layer keeps each type's audience
** (core:audience), builds the event table, sets the current event and
** runs the handlers in threads of its own; the core still hands out the
** ids and stamps the time, so that publishes made on either path agree
** on ids, and bounds the nesting of publish_sync levels on both (EDEPTH).
** On LuaJIT the hot path reaches the same through the FFI (a plain C
** function whose address core:ffi_sync_id gives), so that a trace can
** call it where a Lua C API call would leave the trace.
*/
#include "lcore.h"
#include "lcheck.h"

#define check_core buzz__lcore_check_fast   /* see lcore.h's short names */

/*
** core:sync_id(levels, priority) -> id, ts | nil, "EDEPTH: ...",
** "EDEPTH". publish_sync's hot path asks for the next id and the core's
** clock (ms) with levels of its own publish_sync open (U[depth_slot],
** which the caller keeps), for an event of that priority (0..3, counted
** as published); refused, taking no id, when those and the core's own
** levels make SYNC_MAX. A store's ids come from a durable reservation:
** its events go through core:publish_sync().
*/
int buzz__lhot_sync_id(lua_State *L) {
  lcore *c = check_core(L);
  lua_Integer hot = lua_tointeger(L, 2);   /* 0 unless an integer */
  lua_Integer prio = lua_tointeger(L, 3);
  int levels;
  if (c->eng.store != NULL)
    return luaL_error(L, "core:sync_id() is for a memory bus; a store's "
                      "events go through core:publish_sync()");
  if (hot < 0 || hot > SYNC_MAX) hot = SYNC_MAX;
  levels = c->nsync + (int)hot;
  if (levels >= SYNC_MAX) return push_too_deep(L, levels);
  if (c->eng.bus.last_id >= BUZZ_INT_EXACT)
    return push_fail(L, BUZZ_EINVAL, "no ids left");
  BUZZ_METRIC(c->published[prio >= 0 && prio < BUZZ_NPRIO
                           ? prio : BUZZ_PRIO_NORMAL]++);
  lua_pushinteger(L, (lua_Integer)++c->eng.bus.last_id);
  lua_pushinteger(L, (lua_Integer)buzz__clock_ms());
  return 2;
}

/* The type of ffi_sync_id, as lua/buzz/hot.lua declares it to the FFI. */
typedef double (*ffi_sync_id_fn)(void *core, int hot, int prio,
                                 double *ts);

/*
** core:sync_id for LuaJIT's FFI: core is the core object (the FFI passes
** a userdata as the address of its block, the lcore), hot and prio as
** for sync_id. Returns the next id as a double (ids stay below 2^53) and
** sets *ts to the core's clock (ms); or 0, taking no id, wherever
** sync_id would refuse or raise (a closed bus, a store, EDEPTH, no ids
** left): the caller then asks core:sync_id, which says why. Touches no
** lua_State.
*/
static double ffi_sync_id(void *core, int hot, int prio, double *ts) {
  lcore *c = (lcore *)core;
  if (c == NULL || !c->is_open || c->eng.store != NULL) return 0;
  if (hot < 0 || hot > SYNC_MAX) hot = SYNC_MAX;
  if (c->nsync + hot >= SYNC_MAX) return 0;
  if (c->eng.bus.last_id >= BUZZ_INT_EXACT) return 0;
  BUZZ_METRIC(c->published[prio >= 0 && prio < BUZZ_NPRIO
                           ? prio : BUZZ_PRIO_NORMAL]++);
  *ts = (double)buzz__clock_ms();
  return (double)++c->eng.bus.last_id;
}

/*
** core:ffi_sync_id() -> lightuserdata: the address of ffi_sync_id, which
** lua/buzz/hot.lua casts to a function pointer on LuaJIT (the function
** of this very core.so, whatever path it was loaded from).
*/
int buzz__lhot_ffi_sync_id(lua_State *L) {
  union { ffi_sync_id_fn f; void *p; } u;   /* C has no cast between */
  check_core(L);                            /* the two kinds of pointer */
  u.f = ffi_sync_id;
  lua_pushlightuserdata(L, u.p);
  return 1;
}
