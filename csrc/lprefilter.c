/*
** lprefilter.c: the where{} prefilter. A prefilter is the part of a
** subscription's where{} condition that the
** core tests on the payload before it builds the event table or resumes a
** thread (lua/buzz/filter.lua makes it): an array of clauses { steps, op,
** value }, steps being the path under the payload. It only ever rejects:
** a clause it cannot be sure of holds (a table on the path with a
** metatable, whose __index Lua would call), and the subscription's Lua
** test still decides for every event that gets through. Only raw reads
** and comparisons of two numbers or two strings, so it never raises.
**
** A binding file: ldispatch.c's delivery asks buzz__pf_holds, bus.c asks
** buzz__pf_accept (the bus's accept hook, which lbuzz.c sets), and
** buzz__pf_register puts the operator codes (core.prefilter_ops, which
** filter.lua compiles clauses with) and core.prefilter on the module
** table. No state: the clauses live in the core's ref table U, under the
** subscription's filter_ref, which the binding owns (lsubscribe.c sets it).
*/
#include "compat.h"
#include "buzz.h"
#include "lcheck.h"
#include "lcore.h"

enum { PF_EQ = 1, PF_NE, PF_IN, PF_NOT_IN, PF_LT, PF_LTE, PF_GT, PF_GTE,
       PF_EXISTS, PF_ABSENT, PF_NOPS };
static const char *const pf_names[] = {
  NULL, "eq", "ne", "in", "not_in", "lt", "lte", "gt", "gte", "exists",
  "absent"
};

/*
** Pushes the value at the steps (array at steps) under the value at idx,
** nil where a step meets something that is not a table. Returns 0, with
** nothing pushed, at a table with a metatable.
*/
static int pf_walk(lua_State *L, int idx, int steps) {
  int j, n = (int)buzz_rawlen(L, steps);
  lua_pushvalue(L, idx);
  for (j = 1; j <= n; j++) {
    if (!lua_istable(L, -1)) {
      lua_pop(L, 1);
      lua_pushnil(L);
      return 1;
    }
    if (lua_getmetatable(L, -1)) {
      lua_pop(L, 2);
      return 0;
    }
    lua_rawgeti(L, steps, j);
    lua_rawget(L, -2);
    lua_remove(L, -2);
  }
  return 1;
}

/* Does op hold between the value at v and the clause's value at k? */
static int pf_test(lua_State *L, int op, int v, int k) {
  int t = lua_type(L, v), r;
  switch (op) {
  case PF_EQ: return lua_rawequal(L, v, k);
  case PF_NE: return !lua_rawequal(L, v, k);
  case PF_EXISTS: return t != LUA_TNIL;
  case PF_ABSENT: return t == LUA_TNIL;
  case PF_IN: case PF_NOT_IN:
    if (t == LUA_TNIL) return op == PF_NOT_IN;
    lua_pushvalue(L, v);
    lua_rawget(L, k);
    r = !lua_isnil(L, -1);
    lua_pop(L, 1);
    return op == PF_IN ? r : !r;
  default:                             /* an order: same types only */
    if (t != lua_type(L, k) || (t != LUA_TNUMBER && t != LUA_TSTRING))
      return 0;
    if (op == PF_LT) return buzz_lt(L, v, k);
    if (op == PF_LTE) return buzz_le(L, v, k);
    if (op == PF_GT) return buzz_lt(L, k, v);
    return buzz_le(L, k, v);
  }
}

/*
** May the payload at payload pass the clauses at plan? 0 only when a
** clause surely fails. Leaves the stack as it found it.
*/
static int pf_payload(lua_State *L, int plan, int payload) {
  int top = lua_gettop(L), n = (int)buzz_rawlen(L, plan), i, holds = 1;
  for (i = 1; i <= n && holds; i++) {
    int op;
    lua_rawgeti(L, plan, i);                         /* top+1: clause */
    lua_rawgeti(L, top + 1, 1);                      /* top+2: steps */
    lua_rawgeti(L, top + 1, 2);                      /* top+3: op */
    lua_rawgeti(L, top + 1, 3);                      /* top+4: value */
    {
      int64_t o = 0;
      op = buzz__to_int(L, top + 3, 1, PF_NOPS - 1, &o) ? (int)o : 0;
    }
    if (lua_istable(L, top + 2) && op > 0 &&
        pf_walk(L, payload, top + 2))                /* top+5: at path */
      holds = pf_test(L, op, top + 5, top + 4);
    lua_settop(L, top);
  }
  return holds;
}

/*
** May ev pass the prefilter at ref? Stack: U at u; leaves it as it found
** it. Only called from methods (uses the upvalues).
*/
int buzz__pf_holds(lua_State *L, int u, int ref, const buzz_event *ev) {
  int top = lua_gettop(L), holds;
  if (!lua_checkstack(L, 10)) return 1;
  lua_rawgeti(L, u, ref);                            /* top+1: clauses */
  if (ev->table_ref != BUZZ_NOREF) {                 /* top+2: payload */
    lua_rawgeti(L, u, ev->table_ref);
    lua_pushvalue(L, UV(UV_PAYLOAD));
    lua_rawget(L, -2);
    lua_remove(L, -2);
  } else if (ev->payload_ref != BUZZ_NOREF) {
    lua_rawgeti(L, u, ev->payload_ref);
  } else {
    lua_pushnil(L);
  }
  holds = lua_istable(L, top + 1) ? pf_payload(L, top + 1, top + 2) : 1;
  lua_settop(L, top);
  return holds;
}

/* core.prefilter(plan, payload) -> may it pass? Only spec/filter_spec.lua
** calls it; not gated by BUZZ_TESTING (see core_methods in lbuzz.c). */
static int l_prefilter(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 2);
  luaL_checkstack(L, 10, NULL);
  lua_pushboolean(L, pf_payload(L, 1, 2));
  return 1;
}

/* bus.c asks before it hands a live sub with a prefilter its event. */
int buzz__pf_accept(void *ctx, const buzz_sub *sub,
                    const buzz_event *ev) {
  lctx *x = (lctx *)ctx;
  return x == NULL || buzz__pf_holds(x->L, x->u, sub->filter_ref, ev);
}

/*
** Sets core.prefilter_ops (operator name -> code) and core.prefilter on
** the module table on top.
*/
void buzz__pf_register(lua_State *L) {
  int op;
  lua_newtable(L);
  for (op = 1; op < PF_NOPS; op++) {
    lua_pushinteger(L, op);
    lua_setfield(L, -2, pf_names[op]);
  }
  lua_setfield(L, -2, "prefilter_ops");
  lua_pushcfunction(L, l_prefilter);
  lua_setfield(L, -2, "prefilter");
}
