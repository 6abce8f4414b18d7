/*
** lsubscribe.c: subscriptions on the core object: core:subscribe (live,
** or a durable consumer that reads the store from its saved position),
** core:unsubscribe, core:set_handler (the function next deliveries
** call), core:subs (the live subscription objects) and core:audience
** (whom a publish_sync of a type would reach now). A binding file:
** luaopen_buzz_core in lbuzz.c registers buzz__lsubscribe_methods with
** the core's upvalues (lcore.h).
**
** Invariants: a subscription's Lua object, handler and prefilter are refs
** into U, released by unsubscribe (or with U when the core closes); a
** stale id whose slot has been reused is never taken for the live one
** (live_sub checks the Lua object); a durable consumer name is live at
** most once per bus, and its position is saved when it unsubscribes.
**
** It does not deliver (ldispatch.c does), and keeps no position itself
** (consumer.c appends, saves and finds them).
*/
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "buzz.h"
#include "lcheck.h"
#include "lcore.h"

#define check_core buzz__lcore_check_fast   /* see lcore.h's short names */

/*
** Checks a durable consumer name for subscribe and finds where it starts:
** its saved position, or for a new consumer 0 (the whole log) or, with
** start_new, the last id. Returns 0, or pushes nil, err, code.
*/
static int durable_start(lua_State *L, lcore *c, const char *name,
                         size_t nlen, int start_new, int64_t *acked) {
  char err[ERR_MAX];
  int rc;
  if (c->eng.store == NULL) {
    lua_pushnil(L);
    lua_pushliteral(L, "durable consumers keep their position in a store: "
                    "create the bus with buzz.new{ store = \"events.db\" }");
    lua_pushliteral(L, "EINVAL");
    return 3;
  }
  if (buzz__consumer_find(&c->eng.bus, name)) {
    lua_pushnil(L);
    lua_pushfstring(L, "durable consumer \"%s\" is already subscribed on "
                    "this bus; unsubscribe it first or pick another name",
                    name);
    lua_pushliteral(L, "EINVAL");
    return 3;
  }
  catch_up(L, c);                      /* read its latest position */
  err[0] = '\0';
  rc = buzz__store_consumer(c->eng.store, name, nlen, acked, err, sizeof err);
  if (rc < 0) return push_store_fail(L, rc, err);
  if (rc == 0) *acked = start_new ? c->eng.bus.last_id : 0;
  return 0;
}

/*
** core:subscribe(pattern, subobj, handler, is_once, durable, start_new,
** prefilter) -> id | nil, err, code. subobj is what core:take hands
** out; handler is what the Lua layer calls. durable names a durable
** consumer, which reads the store from its saved position instead of the
** live queue. prefilter (a table, see pf_holds) skips events before
** they are delivered.
*/
static int lcore_subscribe(lua_State *L) {
  lcore *c = check_core(L);
  size_t len, nlen = 0;
  const char *pat = luaL_checklstring(L, 2, &len);
  const char *durable = luaL_optlstring(L, 6, NULL, &nlen);
  int is_once = lua_toboolean(L, 5), u, ref, fn_ref, rc;
  int64_t acked = 0;
  char *name = NULL, err[ERR_MAX];
  buzz_sub *sub;
  luaL_checkany(L, 3);
  luaL_checkany(L, 4);
  if (subject_usage(L, "pattern", pat, len, 1, 1)) return 3;
  if (durable) {
    if (durable_start(L, c, durable, nlen, lua_toboolean(L, 7), &acked))
      return 3;
    if ((name = (char *)malloc(nlen + 1)) == NULL)
      return push_fail(L, BUZZ_ENOMEM, NULL);
    memcpy(name, durable, nlen + 1);
    err[0] = '\0';
    if ((rc = buzz__consumer_append_ack(c->eng.store, name, pat, acked,
                                        err)) < 0) {
      free(name);
      return push_store_fail(L, rc, err);
    }
  }
  u = push_refs(L);
  lua_pushvalue(L, 3);
  ref = luaL_ref(L, u);
  lua_pushvalue(L, 4);
  fn_ref = luaL_ref(L, u);
  if ((rc = buzz__bus_subscribe(&c->eng.bus, pat, len, is_once, ref,
                                &sub)) < 0) {
    luaL_unref(L, u, ref);
    luaL_unref(L, u, fn_ref);
    free(name);
    return push_fail(L, rc, NULL);
  }
  sub->fn_ref = fn_ref;
  if (lua_istable(L, 8)) {             /* a prefilter (see pf_holds); */
    lua_pushvalue(L, 8);               /* released by unsubscribe, */
    sub->filter_ref = luaL_ref(L, u);  /* once_ended, or with U */
  }
  if (name) {
    sub->durable = name;
    sub->acked = sub->saved = acked;
    c->eng.ndurable++;
    buzz__loop_signal(c->loop, 1);
  }
  lua_pushinteger(L, (lua_Integer)sub->slot + 1);
  return 1;
}

/*
** The live subscription whose id is at slot 2 and whose Lua object is the
** value at slot 3 (which guards against a stale id whose slot has been
** reused), or NULL. Pushes U and sets *u to its slot when it finds one.
*/
static buzz_sub *live_sub(lua_State *L, lcore *c, int *u) {
  buzz_sub *sub = buzz__bus_sub(&c->eng.bus, buzz__check_int(L, 2, "id", 0,
                                                         INT64_MAX));
  int is_it;
  if (sub == NULL) return NULL;
  *u = push_refs(L);
  lua_rawgeti(L, *u, sub->data_ref);
  is_it = lua_rawequal(L, -1, 3);
  lua_pop(L, 1);
  return is_it ? sub : NULL;
}

/*
** core:unsubscribe(id, subobj) -> true if it was live. subobj guards
** against a stale id whose slot has been reused.
*/
static int lcore_unsubscribe(lua_State *L) {
  lcore *c = check_core(L);
  int u, ref, fn_ref;
  buzz_sub *sub = live_sub(L, c, &u);
  if (sub == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  ref = sub->data_ref;
  fn_ref = sub->fn_ref;
  sub->data_ref = sub->fn_ref = BUZZ_NOREF;
  unref(L, u, &sub->filter_ref);
  if (sub->durable) {
    char err[ERR_MAX];
    c->eng.ndurable--;
    buzz__consumer_save(c->eng.store, sub, err);   /* keep its place */
  }
  buzz__bus_unsubscribe(&c->eng.bus, sub); /* may free sub */
  luaL_unref(L, u, ref);
  luaL_unref(L, u, fn_ref);
  lua_pushboolean(L, 1);
  return 1;
}

/*
** core:set_handler(id, subobj, fn) -> true | false. Makes fn the function
** the subscription's next deliveries call (the Lua layer re-wraps its
** handlers when middleware is added). A delivery under way keeps the
** function it started with. false if id is not a live subscription of
** subobj.
*/
static int lcore_set_handler(lua_State *L) {
  lcore *c = check_core(L);
  int u, old;
  buzz_sub *sub;
  luaL_checktype(L, 4, LUA_TFUNCTION);
  if ((sub = live_sub(L, c, &u)) == NULL || sub->fn_ref == BUZZ_NOREF) {
    lua_pushboolean(L, 0);
    return 1;
  }
  old = sub->fn_ref;
  lua_pushvalue(L, 4);
  sub->fn_ref = luaL_ref(L, u);        /* released by unsubscribe or U */
  luaL_unref(L, u, old);
  lua_pushboolean(L, 1);
  return 1;
}

/* core:subs() -> array of the live subscription objects, in order */
static int lcore_subs(lua_State *L) {
  lcore *c = check_core(L);
  int u = push_refs(L), n = 0;
  size_t i;
  lua_createtable(L, c->eng.bus.nsubs < INT_MAX ? (int)c->eng.bus.nsubs : 0, 0);
  for (i = 0; i < c->eng.bus.nslots; i++) {
    buzz_sub *sub = c->eng.bus.slots[i];
    if (sub == NULL) continue;
    lua_rawgeti(L, u, sub->data_ref);
    lua_rawseti(L, -2, ++n);
  }
  return 1;
}

/*
** core:audience(type, engine) -> array of the live subobjs a publish_sync
** of type would reach now, in subscription order (durable consumers,
** which read the store, left out), or nil, message, "ESUBJECT" for a
** type publish refuses (a reserved "$" type unless engine is true). The
** hot path memoizes it until subscriptions change.
*/
static int lcore_audience(lua_State *L) {
  lcore *c = check_core(L);
  size_t len, i, n = 0;
  const char *type = luaL_checklstring(L, 2, &len);
  buzz_subject *s;
  buzz_matchvec *v;
  int u, rc;
  if (subject_usage(L, "type", type, len, 0, lua_isnone(L, 3) ||
                    lua_toboolean(L, 3)))
    return 3;
  if ((s = buzz__trie_subject(c->eng.bus.trie, type, len)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  rc = buzz__trie_match(c->eng.bus.trie, s, &v);
  buzz__subject_release(s);
  if (rc < 0) return push_fail(L, rc, NULL);
  u = push_refs(L);
  lua_createtable(L, v->n < INT_MAX ? (int)v->n : 0, 0);
  for (i = 0; i < v->n; i++) {
    if (v->subs[i]->is_dead || v->subs[i]->durable) continue;
    lua_rawgeti(L, u, v->subs[i]->data_ref);
    lua_rawseti(L, -2, (int)++n);
  }
  return 1;
}

/* The methods of this file; luaopen_buzz_core (lbuzz.c) adds them to the
** core's with the upvalues of lcore.h. */
const luaL_Reg buzz__lsubscribe_methods[] = {
  { "subscribe", lcore_subscribe },
  { "unsubscribe", lcore_unsubscribe },
  { "set_handler", lcore_set_handler },
  { "subs", lcore_subs },
  { "audience", lcore_audience },
  { NULL, NULL }
};
