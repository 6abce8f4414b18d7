/*
** ldurable.c: the store side of the core object, as the binding sees it:
** opening the store a bus is created with (its options, the dedup keys
** it loads), the writer's news with the Lua context it needs
** (buzz__lcore_store_sync hands engine.c's buzz__engine_sync the lctx
** that releases the refs of the events a failed group drops;
** buzz__lcore_store_flush waits for every commit first), catching up
** before a read, keeping a store failure that belongs to no delivery
** for the Lua layer to report (U[fail_slot]), and the work take() can hand out now (has_work:
** queued requests and replies, and engine.c's buzz__engine_is_due;
** signal_work keeps a polled descriptor readable while there is some). A
** binding file: its functions are shared through lcore.h with lbuzz.c
** (new, close), lpublish.c, lsubscribe.c, ldispatch.c and lstore.c, and
** it registers no method.
**
** Invariants: the first failure's message is the one reported (engine.c
** keeps the rest of the writer's news invariants); the on_commit hook
** only wakes the loop (it runs on the writer thread).
**
** It does not close the store (lcore_close in lbuzz.c does, after saving
** positions), does not append events (engine.c does, for lpublish.c),
** keeps no durable consumer position (consumer.c does), and delivers
** nothing.
*/
#include <stdio.h>
#include <string.h>

#include "compat.h"
#include "buzz.h"
#include "lcheck.h"
#include "lcore.h"


/* -------------------------------------------------- the writer's news */

/* The writer thread calls this after each commit: wake a polling host. */
static void on_commit(void *data) {
  buzz__loop_wake((buzz_loop *)data);
}

int buzz__lcore_store_fail(lua_State *L, int rc, const char *err) {
  return push_fail(L, rc, err[0] ? err : NULL);
}

/*
** Takes the writer's news (buzz__engine_sync): the committed id, and
** failed groups, whose events are dropped from the queue (their refs
** released through on_event_free, which gets the lctx). Returns 0, or
** BUZZ_ESTORE with the first failure's message in err. Stack: U at u.
*/
int buzz__lcore_store_sync_watch(lua_State *L, lcore *c, int u,
                                 char *err, int64_t watch, int *is_lost) {
  lctx x;
  x.L = L;
  x.c = c;
  x.u = u;
  return buzz__engine_sync(&c->eng, &x, watch, is_lost, err);
}

int buzz__lcore_store_sync(lua_State *L, lcore *c, int u, char *err) {
  return store_sync_watch(L, c, u, err, 0, NULL);
}

/* Waits for every commit, then takes the writer's news (store_sync). */
int buzz__lcore_store_flush(lua_State *L, lcore *c, int u, char *err) {
  buzz__store_flush(c->eng.store);
  return store_sync(L, c, u, err);
}

/*
** Keeps a store failure that belongs to no delivery for the Lua layer to
** report: appended to the array at U[fail_slot] (made on the first), which
** Lua clears (core:holder). Stack: U at u (an absolute index).
*/
void buzz__lcore_report_store(lua_State *L, lcore *c, int u,
                              const char *err) {
  lua_rawgeti(L, u, c->fail_slot);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, u, c->fail_slot);
  }
  lua_pushfstring(L, "ESTORE: %s", err);
  lua_rawseti(L, -2, (lua_Integer)buzz_rawlen(L, -2) + 1);
  lua_pop(L, 1);
}

/*
** Before a read: commits what is in flight, so the read sees the bus's own
** writes. A failed group is kept for Lua to report (report_store).
*/
void buzz__lcore_catch_up(lua_State *L, lcore *c) {
  char err[ERR_MAX];
  int u;
  if (buzz__store_is_idle(c->eng.store)) return;
  u = push_refs(L);
  if (store_flush(L, c, u, err) < 0) report_store(L, c, u, err);
  lua_pop(L, 1);
}


/* ---------------------------------------------------------- work due */

/*
** Work that take() can hand out now: a request or reply queued for the
** Lua layer, or what the engine has due (buzz__engine_is_due: queued
** events past the commit gate, durable consumers behind).
*/
int buzz__lcore_has_work(lcore *c) {
  if ((c->servers != NULL && buzz__lhttp_has_queued(c)) ||
      (c->redis != NULL && buzz__lredis_has_replies(c)))
    return 1;
  return buzz__engine_is_due(&c->eng);
}

/* Keeps a polled descriptor readable exactly while work is due; with a
** store, also consumes the writer's wake-ups once nothing is. */
void buzz__lcore_signal_work(lcore *c) {
  int is_due = has_work(c);
  buzz__loop_signal(c->loop, is_due);
  if (!is_due && c->eng.store) buzz__loop_consume(c->loop);
}


/* ---------------------------------------------------------- opening */

static void dedup_loaded(void *data, buzz_str key, int64_t id, int64_t ts) {
  buzz__dedup_put((buzz_dedup *)data, key.p, key.n, id, ts);
}

/* Ten years in milliseconds: the longest retention the core takes. */
#define AGE_MAX_MS (INT64_C(100000000000) * 1000)

/*
** Reads the numbers of the store options table at t into o (the rest
** zeroed); raises for one out of its range.
*/
void buzz__lcore_store_opts(lua_State *L, int t, buzz_store_opts *o) {
  memset(o, 0, sizeof *o);
  o->durability = (int)buzz__field_int(L, t, "durability", 0, 0, 2);
  o->is_readonly = buzz__field_int(L, t, "readonly", 0, 0, 1) != 0;
  o->max_bytes = buzz__field_int(L, t, "max_bytes", 0, 0, BUZZ_INT_EXACT);
  o->max_backlog = buzz__field_int(L, t, "max_backlog", 0, BUZZ_BACKLOG_MIN,
                                   BUZZ_BACKLOG_LIMIT);  /* 0: the default */
  o->max_age_ms = buzz__field_int(L, t, "max_age_ms", 0, 0, AGE_MAX_MS);
  o->max_events = buzz__field_int(L, t, "max_events", 0, 0,
                                  BUZZ_INT_EXACT);
}

/*
** Raises for store options (the table at t) a store cannot take: a path
** with a NUL byte (C would cut it short there and open another file),
** ":memory:" (SQLite's in-memory database is per connection, and the
** writer thread and the reader each have one: see README). The Lua layer
** raises first, at its caller's level; this guards the core's own
** callers. store_opts() checks the numbers.
*/
void buzz__lcore_check_store_opts(lua_State *L, int t) {
  size_t len;
  const char *path;
  lua_getfield(L, t, "path");
  path = lua_tolstring(L, -1, &len);
  if (path == NULL)
    luaL_error(L, "bad store: expected the path of a SQLite file");
  if (strlen(path) != len)
    luaL_error(L, "bad store: the path contains a NUL byte");
  if (strcmp(path, ":memory:") == 0)
    luaL_error(L, "bad store: \":memory:\" cannot be shared by the "
               "store's writer thread and its reader; omit store for an "
               "in-memory bus");
  lua_pop(L, 1);
}

/*
** Opens the store described by the options table at t (path, durability,
** readonly, max_bytes, max_age_ms, max_events) and, for a writer, loads
** the dedup keys still in their window before now (ms): a reader never
** publishes, so it loads none. Every query an open runs reads an index or
** one end of the rowid order, never the log (see store.c). Returns 0, or
** pushes nil, err, code; raises for an option out of range.
*/
int buzz__lcore_open_store(lua_State *L, lcore *c, int t, int64_t now) {
  buzz_store_opts o;
  char err[ERR_MAX];
  const char *path;
  int rc;
  store_opts(L, t, &o);
  lua_getfield(L, t, "path");
  path = lua_tostring(L, -1);
  o.notify = on_commit;
  o.data = c->loop;
  err[0] = '\0';
  if ((rc = buzz__store_open(&c->eng.store, path, &o, err, sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  lua_pop(L, 1);
  c->eng.durability = o.durability;
  c->eng.bus.last_id = buzz__store_last_id(c->eng.store);
  c->eng.committed = c->eng.bus.last_id;
  if ((rc = buzz__dedup_new(&c->eng.dedup, c->eng.dedup_window)) < 0)
    return push_fail(L, rc, NULL);
  if (o.is_readonly) return 0;         /* it never publishes: no keys */
  if ((rc = buzz__store_dedup_load(c->eng.store, now - c->eng.dedup_window,
                                   dedup_loaded, c->eng.dedup, err,
                                   sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  return 0;
}
