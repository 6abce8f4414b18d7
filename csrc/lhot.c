/*
** lhot.c: the core's side of the hot path of a memory bus
** (lua/buzz/hot.lua). The Lua layer keeps each type's audience
** (core:audience), builds the event table, sets the current event and
** runs the handlers in threads of its own; the core still hands out the
** ids and stamps the time, so that publishes made on either path agree
** on ids, and bounds the nesting of publish_sync levels on both (EDEPTH).
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
