/*
** lbuzz.c: the Lua binding of the core, module "buzz.core": the module's
** opening, the core object's lifecycle and publish. The other binding
** files (l*.c, sharing lcore.h) hold the rest.
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
** Delivery is pulled, and the core never calls a handler: core:take
** (ldispatch.c) hands out what is due and lua/buzz/task.lua runs it;
** publish_sync opens a sync level and returns id, level for the Lua layer
** to take. While a handler runs, its event is current (U[cur_slot], which
** task.lua, core:resume and core:sync set): publish inherits the
** correlation id from it and takes its id as the causation id. The one
** call into Lua left here is the reporter (U.report) for store failures
** that belong to no delivery.
**
** The hot path of the Lua layer (lua/buzz/hot.lua) has a call of its own
** in lhot.c (sync); lcore.h shares the core object and the helpers they
** need.
**
** Engine publishes (the engine flag) may use the reserved "$" types the
** Lua layer's dead letters and system events travel on. The store's
** queries, consumers and state rows are lstore.c's; the where{}
** prefilter, lprefilter.c's; the module functions that need no bus (and
** the subject messages and tracebacks they share), lutil.c's.
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

#define CORE_MT "buzz.core"

/* Helpers of the other binding files (lcore.h), by their names here. */
#define read_page buzz__lstore_read_page
#define set_i buzz__set_field_int
#define pf_holds buzz__pf_holds
#define accept_event buzz__pf_accept
#define subject_usage buzz__lsubject_usage
#define push_traceback buzz__ltraceback

#if BUZZ_NOREF != LUA_NOREF
#error "BUZZ_NOREF must equal LUA_NOREF"
#endif

static const char *const uv_strings[] = {
  "id", "type", "payload", "ts", "priority", "attempt", "key",
  "correlation_id", "causation_id", "headers", "is_active", "version",
  "critical", "high", "normal", "low"
};


/* ------------------------------------------------------------ helpers */

#define check_core buzz__lcore_check_fast

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
  if (ev->table_ref != BUZZ_NOREF && ev->table_ref == x->c->ev_slot) {
    lua_pushboolean(x->L, 0);          /* the slot stays the core's; its */
    lua_rawseti(x->L, x->u, ev->table_ref);  /* table may be collected */
    ev->table_ref = BUZZ_NOREF;
  }
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
** receives the same table. A queued event (not from_args) keeps it in the
** core's ev_slot instead of a ref of its own: only the event at the head
** of the queue's cursor is being handed out at a time (core:take moves
** the cursor; the tables it handed out are the caller's), on_event_free
** empties the slot when it leaves, and one rawseti costs less than a
** luaL_ref and a luaL_unref per event. Only called from methods (uses
** the upvalues).
*/
static void push_event(lua_State *L, lcore *c, int u, buzz_event *ev,
                       int from_args) {
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
  if (ev->version != 0) set_int(L, UV_VERSION, ev->version);
  lua_pushvalue(L, -1);
  if (from_args || c->ev_slot == LUA_NOREF) {
    ev->table_ref = luaL_ref(L, u);    /* on_event_free releases it */
    if (!from_args) c->ev_slot = ev->table_ref;  /* kept from now on */
  } else {
    lua_rawseti(L, u, c->ev_slot);
    ev->table_ref = c->ev_slot;
  }
}


/* ----------------------------------------------------------- delivery */



/* Gives an event record back: to the spare list, or to free() once the
** bus is closed (its spare list is gone). */
static void event_drop(lcore *c, buzz_event *ev) {
  if (c->is_open && !c->bus.is_closed) buzz__event_free(&c->bus.queue, ev);
  else free(ev);
}

/* -------------------------------------------------------------- store */

/* The writer thread calls this after each commit: wake a polling host. */
static void on_commit(void *data) {
  buzz__loop_wake((buzz_loop *)data);
}

static int push_store_fail(lua_State *L, int rc, const char *err) {
  return push_fail(L, rc, err[0] ? err : NULL);
}

typedef struct sync_ctx {
  lcore *c;
  lctx x;
  char *err;
  int n;
  int64_t watch;       /* an event id the caller asks about, or 0 */
  int is_lost;         /* set if watch was in a failed group */
} sync_ctx;

/* A group failed to commit: its events leave the queue, undelivered. */
static void on_store_fail(void *data, const char *msg, int64_t lo,
                          int64_t hi) {
  sync_ctx *y = (sync_ctx *)data;
  size_t dropped = lo > 0 ? buzz__bus_drop_range(&y->c->bus, lo, hi, &y->x)
                   : 0;
  if (lo > 0 && y->c->dedup)          /* a retry must not be a duplicate */
    buzz__dedup_forget(y->c->dedup, lo, hi);
  if (y->watch >= lo && y->watch <= hi && lo > 0) y->is_lost = 1;
  if (y->n++ > 0) return;             /* the first failure tells the story */
  if (lo > 0)
    snprintf(y->err, ERR_MAX, "%s (events %lld to %lld were not stored%s)",
             msg, (long long)lo, (long long)hi,
             dropped ? " and will not be delivered" : "");
  else
    snprintf(y->err, ERR_MAX, "%s", msg);
}

/*
** Takes the writer's news: the committed id, and failed groups, whose
** events are dropped from the queue. Returns 0, or BUZZ_ESTORE with the
** first failure's message in err. Stack: U at u.
*/
static int store_sync_watch(lua_State *L, lcore *c, int u, char *err,
                            int64_t watch, int *is_lost) {
  sync_ctx y;
  y.c = c;
  y.x.L = L;
  y.x.c = c;
  y.x.u = u;
  y.err = err;
  y.n = 0;
  y.watch = watch;
  y.is_lost = 0;
  err[0] = '\0';
  buzz__store_poll(c->store, &c->committed, on_store_fail, &y);
  if (is_lost) *is_lost = y.is_lost;
  return y.n > 0 ? BUZZ_ESTORE : 0;
}

static int store_sync(lua_State *L, lcore *c, int u, char *err) {
  return store_sync_watch(L, c, u, err, 0, NULL);
}

/* Waits for every commit, then takes the writer's news (store_sync). */
static int store_flush(lua_State *L, lcore *c, int u, char *err) {
  buzz__store_flush(c->store);
  return store_sync(L, c, u, err);
}

/* Appends a durable consumer's position for the writer. */
static int append_ack(lcore *c, const char *name, const char *pattern,
                      int64_t acked, char *err) {
  buzz_row spec;
  buzz_row *row;
  memset(&spec, 0, sizeof spec);
  spec.kind = BUZZ_ROW_ACK;
  spec.id = acked;
  spec.ts = buzz__clock_ms();
  spec.type.p = name;
  spec.type.n = strlen(name);
  spec.key.p = pattern;
  spec.key.n = strlen(pattern);
  if ((row = buzz__row_new(&spec)) == NULL) return BUZZ_ENOMEM;
  if (buzz__store_append(c->store, row) < 0) {
    snprintf(err, ERR_MAX, "the store was opened read-only");
    return BUZZ_ESTORE;
  }
  return 0;
}

/* Gives the writer a durable sub's position if it moved since last time. */
static int save_position(lcore *c, buzz_sub *sub, char *err) {
  int rc;
  if (sub->acked == sub->saved) return 0;
  if ((rc = append_ack(c, sub->durable, sub->pattern, sub->acked, err)) < 0)
    return rc;
  sub->saved = sub->acked;
  return 1;
}

/* The live durable sub named name on this bus, or NULL. */
static buzz_sub *find_durable(const lcore *c, const char *name) {
  size_t i;
  for (i = 0; i < c->bus.nslots; i++) {
    buzz_sub *s = c->bus.slots[i];
    if (s && s->durable && strcmp(s->durable, name) == 0) return s;
  }
  return NULL;
}

/* Calls the reporter with a failure that belongs to no delivery. */
static void report_store(lua_State *L, lcore *c, int u, const char *err) {
  lua_rawgeti(L, u, c->report_ref);
  lua_pushfstring(L, "ESTORE: %s", err);
  if (lua_pcall(L, 1, 0, 0) != 0) lua_pop(L, 1);
}

/*
** Before a read: commits what is in flight, so the read sees the bus's own
** writes. A failed group goes to on_error; an on_error that closed the
** bus makes this raise.
*/
static void catch_up(lua_State *L, lcore *c) {
  char err[ERR_MAX];
  int u;
  if (buzz__store_is_idle(c->store)) return;
  u = push_refs(L);
  if (store_flush(L, c, u, err) < 0) report_store(L, c, u, err);
  lua_pop(L, 1);
  if (!c->is_open) luaL_error(L, "attempt to use a closed bus");
}

/*
** Is a durable subscription with no page out behind the committed log?
** committed is a peek at the writer's (store_sync() takes its news).
*/
static int durables_behind(lcore *c, int64_t committed) {
  size_t i;
  if (c->ndurable == 0) return 0;
  for (i = 0; i < c->bus.nslots; i++) {
    buzz_sub *sub = c->bus.slots[i];
    if (sub && sub->durable && sub->page_last == 0 && sub->acked < committed)
      return 1;
  }
  return 0;
}

/*
** Work that take() can hand out now: queued events (with a store, once
** the queue's head is committed) or durable consumers behind. Writes in
** flight are not work: their commit wakes the loop.
*/
static int has_work(lcore *c) {
  int64_t committed;
  if (c->store == NULL) return buzz__bus_pending(&c->bus) > 0;
  committed = buzz__store_committed(c->store);
  if (buzz__bus_pending(&c->bus) > 0) {
    int p;
    const buzz_queue *q = &c->bus.queue;
    if (c->gate_id <= committed) return 1;
    for (p = 0; p < BUZZ_NPRIO && !q->head[p]; p++) {}
    if (p < BUZZ_NPRIO && q->head[p]->id <= committed) return 1;
  }
  return durables_behind(c, committed);
}

/* Keeps a polled descriptor readable exactly while work is due; with a
** store, also consumes the writer's wake-ups once nothing is. */
static void signal_work(lcore *c) {
  int is_due = has_work(c);
  buzz__loop_signal(c->loop, is_due);
  if (!is_due && c->store) buzz__loop_consume(c->loop);
}

static void dedup_loaded(void *data, buzz_str key, int64_t id, int64_t ts) {
  buzz__dedup_put((buzz_dedup *)data, key.p, key.n, id, ts);
}

/* Ten years in milliseconds: the longest retention the core takes. */
#define AGE_MAX_MS (INT64_C(100000000000) * 1000)

/*
** Reads the numbers of the store options table at t into o (the rest
** zeroed); raises for one out of its range.
*/
static void store_opts(lua_State *L, int t, buzz_store_opts *o) {
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
static void check_store_opts(lua_State *L, int t) {
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
static int open_store(lua_State *L, lcore *c, int t, int64_t now) {
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
  if ((rc = buzz__store_open(&c->store, path, &o, err, sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  lua_pop(L, 1);
  c->durability = o.durability;
  c->bus.last_id = buzz__store_last_id(c->store);
  c->committed = c->bus.last_id;
  if ((rc = buzz__dedup_new(&c->dedup, c->dedup_window)) < 0)
    return push_fail(L, rc, NULL);
  if (o.is_readonly) return 0;         /* it never publishes: no keys */
  if ((rc = buzz__store_dedup_load(c->store, now - c->dedup_window,
                                   dedup_loaded, c->dedup, err,
                                   sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  return 0;
}


/* -------------------------------------------------------------- core */

/*
** core.new(queue_limit, report, opts) -> core | nil, err, code.
** report(err, ev, sub, trace) is called for every failed delivery (and
** with err alone for a store failure that belongs to no delivery). opts
** (optional): dedup_window_ms, max_payload, now_ms (the bus's clock, for
** the dedup keys a store loads), and store = { path, durability (0 none,
** 1 batch, 2 sync), readonly, max_bytes, max_backlog, max_age_ms, max_events }. A
** number out of its range raises, naming the option.
*/
static int lcore_new(lua_State *L) {
  int64_t limit = buzz__opt_int(L, 1, "queue_limit", 100000, 0,
                                BUZZ_INT_EXACT);
  int64_t window = 0, max_payload = 0, now;
  lcore *c;
  int rc, has_opts = lua_istable(L, 3);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 3);
  if (has_opts) {                      /* may raise: before acquiring */
    buzz_store_opts o;
    window = buzz__field_int(L, 3, "dedup_window_ms", 0, 0,
                             INT64_C(31536000000));   /* a year */
    max_payload = buzz__field_int(L, 3, "max_payload", 0, 0,
                                  BUZZ_INT_EXACT);
    lua_getfield(L, 3, "store");
    if (lua_istable(L, -1)) {
      check_store_opts(L, lua_gettop(L));
      store_opts(L, lua_gettop(L), &o);
    }
    lua_pop(L, 1);
  }
  now = has_opts ? buzz__field_int(L, 3, "now_ms", 0, 0, BUZZ_INT_EXACT) : 0;
  if (now == 0) now = buzz__clock_ms();
  c = (lcore *)buzz_newud(L, sizeof *c);
  memset(c, 0, sizeof *c);             /* closed until acquired */
  c->bus.is_closed = 1;
  c->upcast_ref = LUA_NOREF;
  c->ev_slot = LUA_NOREF;
  c->batch_ref = LUA_NOREF;
  c->batch_prio = -1;
  c->dedup_window = window > 0 ? window : 120000;
  c->max_payload = max_payload > 0 ? (size_t)max_payload : 1048576;
  luaL_setmetatable(L, CORE_MT);
  lua_newtable(L);                     /* U */
  lua_pushvalue(L, 2);
  c->report_ref = luaL_ref(L, -2);
  lua_pushboolean(L, 0);               /* U[cur_slot]: the current */
  c->cur_slot = luaL_ref(L, -2);       /* event, false for none */
  buzz_setuv(L, -2);
  if ((rc = buzz__bus_init(&c->bus, (size_t)limit)) < 0)
    return push_fail(L, rc, NULL);
  c->bus.on_event_free = on_event_free;
  c->bus.accept = accept_event;
  if ((rc = buzz__loop_new(&c->loop)) < 0) {
    buzz__bus_close(&c->bus, NULL);
    return push_fail(L, rc, NULL);
  }
  if (has_opts) {
    lua_getfield(L, 3, "store");
    if (lua_istable(L, -1) && open_store(L, c, lua_gettop(L), now) != 0) {
      buzz__dedup_free(c->dedup);      /* nil, err, code are on top */
      c->dedup = NULL;
      buzz__store_close(c->store);
      c->store = NULL;
      buzz__bus_close(&c->bus, NULL);
      buzz__loop_close(c->loop);
      c->loop = NULL;
      return 3;
    }
  }
  c->is_open = 1;
  lua_settop(L, 4);
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
  if (c->store && c->bus.slots != NULL) {   /* durable positions, before */
    size_t i;                              /* the writer stops */
    char err[ERR_MAX];
    for (i = 0; i < c->bus.nslots; i++)
      if (c->bus.slots[i] && c->bus.slots[i]->durable)
        save_position(c, c->bus.slots[i], err);
  }
  if (c->store)                        /* the next session goes on from */
    buzz__ids_release(c->store, c->bus.last_id);   /* here, no gap */
  n = buzz__bus_close(&c->bus, NULL);  /* U is dropped whole below */
  c->ndurable = 0;
  buzz__store_close(c->store);         /* commits what is left; before the
                                          loop, whose handle it wakes */
  c->store = NULL;
  buzz__dedup_free(c->dedup);
  c->dedup = NULL;
  buzz__loop_close(c->loop);
  c->loop = NULL;
  lua_newtable(L);
  buzz_setuv(L, 1);
  lua_pushinteger(L, (lua_Integer)n);
  return 1;
}

/* __gc and __close, one function: closes (idempotent, never raises). */
static int lcore_gc(lua_State *L) {
  luaL_checkudata(L, 1, CORE_MT);
  lcore_close(L);
  return 0;
}

static int lcore_is_closed(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  lua_pushboolean(L, !c->is_open);
  return 1;
}

/*
** Checks a durable consumer name for subscribe and finds where it starts:
** its saved position, or for a new consumer 0 (the whole log) or, with
** start_new, the last id. Returns 0, or pushes nil, err, code.
*/
static int durable_start(lua_State *L, lcore *c, const char *name,
                         size_t nlen, int start_new, int64_t *acked) {
  char err[ERR_MAX];
  int rc;
  if (c->store == NULL) {
    lua_pushnil(L);
    lua_pushliteral(L, "durable consumers keep their position in a store: "
                    "create the bus with buzz.new{ store = \"events.db\" }");
    lua_pushliteral(L, "EINVAL");
    return 3;
  }
  if (find_durable(c, name)) {
    lua_pushnil(L);
    lua_pushfstring(L, "durable consumer \"%s\" is already subscribed on "
                    "this bus; unsubscribe it first or pick another name",
                    name);
    lua_pushliteral(L, "EINVAL");
    return 3;
  }
  catch_up(L, c);                      /* read its latest position */
  err[0] = '\0';
  rc = buzz__store_consumer(c->store, name, nlen, acked, err, sizeof err);
  if (rc < 0) return push_store_fail(L, rc, err);
  if (rc == 0) *acked = start_new ? c->bus.last_id : 0;
  return 0;
}

/*
** core:subscribe(pattern, subobj, handler, is_once, durable, start_new,
** prefilter) -> id | nil, err, code. subobj is what next() and the
** reporter hand back; handler is called. durable names a durable
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
    if ((rc = append_ack(c, name, pat, acked, err)) < 0) {
      free(name);
      return push_store_fail(L, rc, err);
    }
  }
  u = push_refs(L);
  lua_pushvalue(L, 3);
  ref = luaL_ref(L, u);
  lua_pushvalue(L, 4);
  fn_ref = luaL_ref(L, u);
  if ((rc = buzz__bus_subscribe(&c->bus, pat, len, is_once, ref, &sub)) < 0) {
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
    c->ndurable++;
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
  buzz_sub *sub = buzz__bus_sub(&c->bus, buzz__check_int(L, 2, "id", 0,
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
    c->ndurable--;
    save_position(c, sub, err);        /* keep its place */
  }
  buzz__bus_unsubscribe(&c->bus, sub);   /* may free sub */
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

/* Pushes nil, err, code for an event the store's append refused. */
static int push_append_fail(lua_State *L, lcore *c, int rc) {
  buzz_store_stats st;
  char msg[ERR_MAX];
  if (rc != BUZZ_EFULL)
    return push_fail(L, rc, "the store was opened read-only");
  buzz__store_stats(c->store, &st);
  snprintf(msg, sizeof msg, "the store's writer is behind: %lld bytes "
           "wait to be written (max_backlog = %lld); retry when it has "
           "caught up (bus:flush() waits for that) or raise max_backlog",
           (long long)st.backlog_bytes, (long long)st.backlog_limit);
  return push_fail(L, rc, msg);
}

/*
** With a store: makes sure the next id (bus.last_id + 1) is reserved
** (ids.c), so that no crash can hand it out again. Returns 0, or BUZZ_ESTORE
** (or BUZZ_ENOMEM) with the reason in err: the id is then not used. Callers
** skip the call while NEED_ID() is false: the hot path is one comparison.
** Stack: U at u.
*/
#define NEED_ID(c) ((c)->bus.last_id >= (c)->id_safe)

static int take_id(lua_State *L, lcore *c, int u, char *err) {
  char why[ERR_MAX];
  int rc;
  if ((rc = buzz__ids_take(c->store, c->bus.last_id + 1, &c->id_safe)) == 0)
    return 0;
  if (rc == BUZZ_ESTORE && store_sync(L, c, u, why) < 0)
    snprintf(err, ERR_MAX, "cannot reserve ids, so nothing was published: "
             "%.*s", ERR_MAX - 64, why);        /* room for the head */
  else if (rc == BUZZ_ESTORE)
    snprintf(err, ERR_MAX, "cannot reserve ids, so nothing was published "
             "(the store is read-only, or its last reservation failed)");
  else
    snprintf(err, ERR_MAX, "%s", buzz__err_message(rc));
  return rc;
}

/*
** With a store: encodes the payload (slot 3) and headers (slot 8), appends
** the row (id and ts preset in ev) and, for sync durability or a
** publish_sync, waits for its commit. Returns 0, or pushes nil, err, code
** (EINVAL/ETOOBIG for a payload JSON cannot hold, which the Lua layer
** raises; ESTORE for the world) and returns 3. Stack: U at u.
*/
static int store_publish(lua_State *L, lcore *c, int u, buzz_event *ev,
                         int is_sync, const char *type, size_t len,
                         const char *dkey, size_t dlen) {
  buzz_row spec, *row;
  char err[ERR_MAX];
  int rc, top = lua_gettop(L);
  memset(&spec, 0, sizeof spec);
  if ((rc = store_sync(L, c, u, err)) < 0)  /* an earlier group failed */
    return push_store_fail(L, rc, err);
  if (NEED_ID(c) && (rc = take_id(L, c, u, err)) < 0)
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
  spec.kind = BUZZ_ROW_EVENT;
  spec.id = ev->id = c->bus.last_id + 1;
  if (ev->ts == 0) ev->ts = buzz__clock_ms();   /* or the caller's */
  spec.ts = ev->ts;
  spec.causation_id = ev->causation_id;
  spec.priority = ev->priority;
  spec.version = ev->version ? ev->version : 1;
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
  if ((row = buzz__row_new(&spec)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  lua_settop(L, top);
  if ((rc = buzz__store_append(c->store, row)) < 0)
    return push_append_fail(L, c, rc);
  c->appended_id = spec.id;
  if ((is_sync && c->durability != BUZZ_DUR_NONE) ||
      c->durability == BUZZ_DUR_SYNC) {
    int is_lost;
    buzz__store_flush(c->store);
    if ((rc = store_sync_watch(L, c, u, err, ev->id, &is_lost)) < 0) {
      if (is_lost) {                   /* this event: the caller is told */
        if (c->bus.last_id < ev->id) c->bus.last_id = ev->id; /* used */
        return push_store_fail(L, rc, err);
      }
      report_store(L, c, u, err);      /* another group's failure (an
                                          on_error that closes the bus
                                          gets ECLOSED from bus_publish) */
    }
  }
  return 0;
}

/*
** Pushes the current event (U[cur_slot]: lua/buzz/task.lua, core:resume
** and core:sync set it while a handler runs), or false when there is
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

/* Pushes nil, "EDEPTH: ...", "EDEPTH": publish_sync nested too deep. */
static int push_too_deep(lua_State *L, lcore *c) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: publish_sync nested %d deep: a handler run by "
                  "publish_sync may publish_sync again at most %d levels "
                  "deep; nothing was published (use publish to queue the "
                  "event)", buzz__err_name(BUZZ_EDEPTH), c->nsync + 1,
                  SYNC_MAX);
  lua_pushstring(L, buzz__err_name(BUZZ_EDEPTH));
  return 3;
}

/*
** Shared by publish and publish_sync. Arguments: self,
** type, payload, priority (0..3), key, correlation_id, causation_id,
** headers, dedup, version, engine, ts (ms; 0 or nil: the core's clock,
** else the time to stamp, as a manual clock gives it). Inside a handler
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
  int is_engine = lua_toboolean(L, 11);
  int64_t ts = buzz__opt_int(L, 12, "ts", 0, 0, BUZZ_INT_EXACT);
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
  if (mode == 1 && c->nsync >= SYNC_MAX) return push_too_deep(L, c);
  lua_settop(L, 10);
  ctx.L = L;
  ctx.c = c;
  ctx.u = push_refs(L);                /* slot 11 */
  push_current(L, c, ctx.u);           /* slot 12: inherited from */
  if (dkey) now = ts > 0 ? ts : buzz__clock_ms();  /* the bus's clock */
  if (dkey && c->dedup &&
      (id = buzz__dedup_find(c->dedup, dkey, dlen, now)) != 0) {
    lua_pushinteger(L, (lua_Integer)id);
    lua_pushliteral(L, "duplicate");
    return 2;
  }
  if (lua_isnil(L, 6) && lua_istable(L, 12)) {
    push_correlation(L, 12);           /* inherit it */
    lua_replace(L, 6);
  }
  if (c->store && mode == 0 && c->bus.queue.limit &&   /* before the */
      c->bus.queue.count >= c->bus.queue.limit)         /* append; the */
    goto full;                         /* bus checks memory buses itself */
  if ((ev = buzz__event_new(&c->bus.queue)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  ev->priority = (unsigned char)prio;
  ev->causation_id = caus == 0 ? event_id(L, 12) : (int64_t)caus;
  ev->version = (int)version;
  if (ts > 0) ev->ts = (int64_t)ts;    /* a manual clock's time */
  if (c->store &&
      store_publish(L, c, ctx.u, ev, mode == 1, type, len, dkey, dlen)) {
    event_drop(c, ev);
    return 3;
  }
  rc = buzz__bus_publish(&c->bus, ev, type, len, mode != 0, &level);
  if (rc < 0) {
    if (c->store && c->bus.last_id < ev->id)
      c->bus.last_id = ev->id;         /* appended already: used up */
    event_drop(c, ev);
    if (rc == BUZZ_EFULL) goto full;
    return push_fail(L, rc, NULL);
  }
  id = c->bus.last_id;
  if (dkey) {
    if (c->dedup == NULL &&
        buzz__dedup_new(&c->dedup, c->dedup_window) < 0)
      return push_fail(L, BUZZ_ENOMEM, NULL);
    if (buzz__dedup_put(c->dedup, dkey, dlen, id, now) < 0)
      return push_fail(L, BUZZ_ENOMEM, NULL);
  }
  if (rc == 0) {                       /* no audience: freed already */
    lua_pushinteger(L, (lua_Integer)id);
    return 1;
  }
  if (c->store && mode == 0 && c->durability != BUZZ_DUR_NONE)
    c->gate_id = id;                   /* deliver only once committed */
  if (mode != 1) {                     /* values wait in U until delivery */
    ev->payload_ref = ref_opt(L, ctx.u, 3);
    ev->key_ref = ref_opt(L, ctx.u, 5);
    ev->headers_ref = ref_opt(L, ctx.u, 8);
    ev->corr_ref = ref_opt(L, ctx.u, 6);
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
  lua_pushnil(L);
  {                                    /* a count: no (int) cut */
    char num[24];
    snprintf(num, sizeof num, "%zu", buzz__bus_pending(&c->bus));
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

/* core:subs() -> array of the live subscription objects, in order */
static int lcore_subs(lua_State *L) {
  lcore *c = check_core(L);
  int u = push_refs(L), n = 0;
  size_t i;
  lua_createtable(L, c->bus.nsubs < INT_MAX ? (int)c->bus.nsubs : 0, 0);
  for (i = 0; i < c->bus.nslots; i++) {
    buzz_sub *sub = c->bus.slots[i];
    if (sub == NULL) continue;
    lua_rawgeti(L, u, sub->data_ref);
    lua_rawseti(L, -2, ++n);
  }
  return 1;
}

static int lcore_pending(lua_State *L) {
  lcore *c = check_core(L);
  lua_pushinteger(L, (lua_Integer)buzz__bus_pending(&c->bus));
  return 1;
}

/* core:timeout() -> ms until work is due: 0 now, -1 never (nothing armed) */
static int lcore_timeout(lua_State *L) {
  lcore *c = check_core(L);
  if (has_work(c)) lua_pushinteger(L, 0);
  else lua_pushinteger(L, buzz__loop_timeout(c->loop));
  return 1;
}

/*
** core:arm(ms) -> true. Arms the loop's one-shot timer to fire in ms
** milliseconds (an integer >= 0; arming again replaces the due time), or
** with -1 or nil disarms it. While it is armed, timeout() counts down to
** it and wait() returns when it fires; firing does nothing else.
*/
static int lcore_arm(lua_State *L) {
  lcore *c = check_core(L);
  int64_t ms = buzz__opt_int(L, 2, "ms (-1 or nil disarms)", -1, -1,
                             BUZZ_INT_EXACT);
  int rc;
  if ((rc = buzz__loop_arm(c->loop, (int64_t)ms)) < 0)
    return push_fail(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* core:fd() -> the descriptor a host polls; readable while work is due. */
static int lcore_fd(lua_State *L) {
  lcore *c = check_core(L);
  lua_pushinteger(L, buzz__loop_fd(c->loop));
  signal_work(c);
  return 1;
}

/*
** core:wait() -> true after one round of loop activity, false if none can
** come (nothing pending, nothing armed, no write in flight). A write in
** flight is waited for here: its commit may give durable consumers work.
** An armed timer (arm()) is activity to come: wait() returns when it
** fires, or sooner.
*/
static int lcore_wait(lua_State *L) {
  lcore *c = check_core(L);
  if (has_work(c)) lua_pushboolean(L, 1);
  else lua_pushboolean(L, buzz__loop_wait(c->loop, c->store != NULL &&
                                          !buzz__store_is_idle(c->store)));
  return 1;
}

/* core:flush() -> true | nil, err, code: waits for every commit. */
static int lcore_flush(lua_State *L) {
  lcore *c = check_core(L);
  char err[ERR_MAX];
  int rc;
  if (c->store == NULL) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if ((rc = store_flush(L, c, push_refs(L), err)) < 0)
    return push_store_fail(L, rc, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* core:set_upcast(fn | nil): fn(ev) upcasts stored events in place. */
/*
** Makes *ref a U ref to the value at slot 2 (a function), or LUA_NOREF
** for nil, releasing the one it held. Released here or with U.
*/
static void set_fn_ref(lua_State *L, int *ref) {
  int u = push_refs(L);
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  unref(L, u, ref);
  if (!lua_isnoneornil(L, 2)) {
    lua_pushvalue(L, 2);
    *ref = luaL_ref(L, u);
  }
  lua_pop(L, 1);
}

static int lcore_set_upcast(lua_State *L) {
  set_fn_ref(L, &check_core(L)->upcast_ref);
  return 0;
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
  if ((s = buzz__trie_subject(c->bus.trie, type, len)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  rc = buzz__trie_match(c->bus.trie, s, &v);
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

/*
** core:holder() -> U, slot: U[slot] is the current event (false: none).
** lua/buzz/task.lua sets it while it runs a handler, as core:resume and
** core:sync do while they resume; publish inherits from it. U is the
** core's ref table: nothing else in it is for Lua to touch.
*/
static int lcore_holder(lua_State *L) {
  lcore *c = check_core(L);
  push_refs(L);
  lua_pushinteger(L, c->cur_slot);
  return 2;
}

static int lcore_stats(lua_State *L) {
  lcore *c = check_core(L);
  lua_createtable(L, 0, 6);
  set_i(L, "pending", (int64_t)buzz__bus_pending(&c->bus));
  set_i(L, "subscriptions", (int64_t)c->bus.nsubs);
  set_i(L, "last_id", c->bus.last_id);
  set_i(L, "cached_types", (int64_t)buzz__trie_cached(c->bus.trie));
  set_i(L, "type_misses", buzz__trie_misses(c->bus.trie));
  set_i(L, "queue_limit", (int64_t)c->bus.queue.limit);
  return 1;
}

static int lcore_tostring(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  lua_pushfstring(L, "buzz.core (%s)", c->is_open ? "open" : "closed");
  return 1;
}


/* ------------------------------------------- for the other binding files */

/* The helpers lcore.h declares, for lhot.c and lstore.c: the static ones
** above stay inlinable here. */
lcore *buzz__lcore_check(lua_State *L) { return check_core(L); }
int buzz__lcore_refs(lua_State *L) { return push_refs(L); }
int buzz__lcore_fail(lua_State *L, int rc, const char *detail) {
  return push_fail(L, rc, detail);
}
int buzz__lcore_store_sync(lua_State *L, lcore *c, int u, char *err) {
  return store_sync(L, c, u, err);
}
int buzz__lcore_store_flush(lua_State *L, lcore *c, int u, char *err) {
  return store_flush(L, c, u, err);
}
void buzz__lcore_catch_up(lua_State *L, lcore *c) { catch_up(L, c); }
buzz_sub *buzz__lcore_find_durable(const lcore *c, const char *name) {
  return find_durable(c, name);
}
void buzz__lcore_unref(lua_State *L, int u, int *ref) { unref(L, u, ref); }
void buzz__lcore_current(lua_State *L, lcore *c, int u) {
  push_current(L, c, u);
}
int64_t buzz__lcore_event_id(lua_State *L, int idx) {
  return event_id(L, idx);
}
void buzz__lcore_correlation(lua_State *L, int idx) {
  push_correlation(L, idx);
}
int buzz__lcore_too_deep(lua_State *L, lcore *c) {
  return push_too_deep(L, c);
}

void buzz__lcore_push_event(lua_State *L, lcore *c, int u, buzz_event *ev,
                            int from_args) {
  push_event(L, c, u, ev, from_args);
}
int buzz__lcore_save_position(lcore *c, buzz_sub *sub, char *err) {
  return save_position(c, sub, err);
}
void buzz__lcore_signal_work(lcore *c) { signal_work(c); }

/*
** One test-only entry point remains: core.prefilter (lprefilter.c, only
** spec/filter_spec.lua). It is deliberately not compiled out without
** -DBUZZ_TESTING: `make` builds one core.so per interpreter that is both
** the build README hands users and the one the suite (and make asan,
** coverage, the Neovim and nginx host tests) loads, so gating it would
** either ship it anyway or make the suite test a core other than the
** shipped one. It goes once filter_spec.lua tests clauses through
** subscribe{ where }. (next and publish_cursor went with core:take.)
*/
static const luaL_Reg core_methods[] = {
  { "subscribe", lcore_subscribe },
  { "unsubscribe", lcore_unsubscribe },
  { "publish", lcore_publish },
  { "publish_sync", lcore_publish_sync },
  { "sync", buzz__lhot_sync },
  { "set_handler", lcore_set_handler },
  { "current", lcore_current },
  { "holder", lcore_holder },
  { "subs", lcore_subs },
  { "pending", lcore_pending },
  { "timeout", lcore_timeout },
  { "arm", lcore_arm },
  { "fd", lcore_fd },
  { "wait", lcore_wait },
  { "audience", lcore_audience },
  { "stats", lcore_stats },
  { "flush", lcore_flush },
  { "set_upcast", lcore_set_upcast },
  { "close", lcore_close },
  { "is_closed", lcore_is_closed },
  { NULL, NULL }
};

static const luaL_Reg module_funcs[] = {
  { "new", lcore_new },
  { NULL, NULL }
};

/* Pushes the UV_COUNT upvalues of every method (lcore.h): the metatable
** at mt, then the strings. */
static void push_upvalues(lua_State *L, int mt) {
  size_t i;
  lua_pushvalue(L, mt);                /* UV_MT: methods check against it */
  for (i = 0; i < sizeof uv_strings / sizeof uv_strings[0]; i++)
    lua_pushstring(L, uv_strings[i]);
}

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
    lua_newtable(L);
    push_upvalues(L, -2);
    luaL_setfuncs(L, core_methods, UV_COUNT);
    push_upvalues(L, -2);
    luaL_setfuncs(L, buzz__lstore_methods, UV_COUNT);
    push_upvalues(L, -2);
    luaL_setfuncs(L, buzz__ldispatch_methods, UV_COUNT);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, lcore_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, lcore_gc);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, lcore_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_setfuncs(L, module_funcs, 0);
  luaL_setfuncs(L, buzz__lutil_funcs, 0);
  buzz__json_register(L);
  buzz__pf_register(L);
  {                                    /* the error map: code -> meaning */
    size_t i;
    int code;
    lua_newtable(L);
    for (i = 0; (code = buzz__err_code(i)) != 0; i++) {
      lua_pushstring(L, buzz__err_message(code));
      lua_setfield(L, -2, buzz__err_name(code));
    }
    lua_setfield(L, -2, "errors");
  }
  lua_pushliteral(L, "0.1.0");
  lua_setfield(L, -2, "version");
  return 1;
}
