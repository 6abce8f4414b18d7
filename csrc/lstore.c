/*
** lstore.c: the store's Lua API on the core object: one page of stored
** events (core:query), durable consumers (consumers, remove_consumer),
** what the store holds (store_info), the Lua layer's state rows
** (state_put, state_del, state_list, which also looks one row up), and
** the conversion of a stored row to the event table handlers and readers
** get (buzz__lstore_read_page, which durable consumers' delivery in
** ldispatch.c reads its pages with). A
** binding file: the methods are registered from buzz__lstore_methods by
** luaopen_buzz_core in lbuzz.c, with the same upvalues as the core's
** other methods (lcore.h), so the row conversion sets fields from the
** interned key strings.
**
** Invariants: every read sees the bus's own writes (need_store commits
** what is in flight first, through ldurable.c's catch_up); a stored row that
** does not decode is never rewritten here, it comes back with
** decode_error set; every write goes to the writer in order with the
** bus's other writes (the same group commit). A memory bus has no store:
** these methods return nil, err, "EINVAL" there. Rows come back as
** stored: Lua upcasts them (lua/buzz/store.lua), the core calls no Lua.
**
** It does not own the store (ldurable.c opens it, lbuzz.c closes it),
** does not take the writer's news by itself (ldurable.c's store_sync and
** store_flush, over engine.c), keeps no durable position (consumer.c
** does), and delivers nothing.
*/
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "compat.h"
#include "store.h"
#include "json.h"
#include "lcheck.h"
#include "lcore.h"

#define check_core buzz__lcore_check   /* see lcore.h's short names */


/* ------------------------------------------------- stored rows to Lua */

/* Sets field UV(key) of the table on top to the integer v. */
static void set_int(lua_State *L, int key, int64_t v) {
  lua_pushvalue(L, UV(key));
  lua_pushinteger(L, (lua_Integer)v);
  lua_rawset(L, -3);
}

/* Sets field UV(key) of the table on top to the string v, if present. */
static void set_str(lua_State *L, int key, buzz_str v) {
  if (v.p == NULL) return;
  lua_pushvalue(L, UV(key));
  lua_pushlstring(L, v.p, v.n);
  lua_rawset(L, -3);
}

/*
** The type string of the row before, in stack slot slot (nil at first):
** the rows of a page mostly share a few types, and comparing the bytes
** costs less than Lua interning them again.
*/
typedef struct type_memo {
  int slot;
  const char *p;   /* borrows: the bytes of the string in slot */
  size_t n;
} type_memo;

/* Sets field UV(UV_TYPE) of the table on top to the string v, if present. */
static void set_type(lua_State *L, type_memo *m, buzz_str v) {
  if (v.p == NULL) return;
  lua_pushvalue(L, UV(UV_TYPE));
  if (m->p != NULL && v.n == m->n && memcmp(v.p, m->p, v.n) == 0) {
    lua_pushvalue(L, m->slot);
  } else {
    lua_pushlstring(L, v.p, v.n);
    m->p = lua_tolstring(L, -1, &m->n);
    lua_pushvalue(L, -1);
    lua_replace(L, m->slot);
  }
  lua_rawset(L, -3);
}

/*
** Decodes JSON text into field UV(key) of the table on top (event id). A
** row that does not decode leaves the field unset and gets decode_error =
** "EDECODE: event <id>'s stored <what> is not valid JSON (...)" instead
** (the log is never rewritten here); returns 0, or BUZZ_EDECODE then.
*/
static int set_json(lua_State *L, int key, buzz_str v, int64_t id,
                    const char *what) {
  if (v.p == NULL) return 0;
  lua_pushvalue(L, UV(key));
  if (buzz__json_decode(L, v.p, v.n) == 0) {
    lua_rawset(L, -3);
    return 0;
  }
  lua_remove(L, -2);                   /* the key */
  {
    char num[32];
    snprintf(num, sizeof num, "%lld", (long long)id);
    lua_pushfstring(L, "%s: event %s's stored %s is not valid JSON (",
                    buzz__err_name(BUZZ_EDECODE), num, what);
  }
  lua_insert(L, -2);                   /* the decoder's message */
  lua_pushliteral(L, ")");
  lua_concat(L, 3);
  lua_setfield(L, -2, "decode_error");
  return BUZZ_EDECODE;
}

/*
** Pushes the event table of a stored row, as stored (Lua upcasts it:
** lua/buzz/store.lua). Returns 0; or BUZZ_EDECODE, the table still on
** top, when its payload or headers do not decode (see set_json). Only
** called from methods (uses the upvalues).
*/
static int push_stored(lua_State *L, type_memo *m, const buzz_stored *r) {
  int prio = r->priority >= 0 && r->priority < BUZZ_NPRIO ? r->priority
             : BUZZ_PRIO_NORMAL, rc;
  lua_createtable(L, 0, 7 + (r->key_kind != 0) + (r->corr.p != NULL) +
                         (r->causation_id != 0) + (r->headers.p != NULL));
  set_int(L, UV_ID, r->id);
  set_type(L, m, r->type);
  rc = set_json(L, UV_PAYLOAD, r->payload, r->id, "payload");
  set_int(L, UV_TS, r->ts);
  lua_pushvalue(L, UV(UV_PRIORITY));
  lua_pushvalue(L, UV(UV_PRIO0 + prio));
  lua_rawset(L, -3);
  set_int(L, UV_ATTEMPT, 1);
  if (r->key_kind == 1) set_str(L, UV_KEY, r->key);
  else if (r->key_kind == 2) set_int(L, UV_KEY, r->key_int);
  set_str(L, UV_CORR, r->corr);
  if (r->causation_id) set_int(L, UV_CAUS, r->causation_id);
  if (rc == 0) rc = set_json(L, UV_HEADERS, r->headers, r->id, "headers");
  set_int(L, UV_VERSION, r->version);
  if (r->stream.p != NULL) {
    set_str(L, UV_STREAM, r->stream);
    set_int(L, UV_SVERSION, r->stream_version);
  }
  return rc;
}

/*
** Reads one page of stored events into a new array on top: the rows of q
** up to q->limit. Returns the number read; if (with is_strict) a row
** does not decode, the page stops before it, *bad_id is its id, and the
** message and the row's event table are pushed above the array. Without
** is_strict a row that does not decode is in the page, with decode_error
** set. A store failure returns a negative code with a message on top
** instead of the array.
*/
int buzz__lstore_read_page(lua_State *L, lcore *c, const buzz_query *q,
                           int is_strict, int64_t *bad_id) {
  buzz_stored row;
  type_memo memo;
  char err[ERR_MAX];
  int n = 0, rc;
  err[0] = '\0';
  *bad_id = 0;
  if (buzz__store_query(c->eng.store, q) < 0) {
    lua_pushliteral(L, "cannot query the store");
    return BUZZ_ESTORE;
  }
  lua_pushnil(L);                         /* memo.slot, removed below */
  memo.slot = lua_gettop(L);
  memo.p = NULL;
  memo.n = 0;
  lua_createtable(L, q->limit < 1024 ? (int)q->limit : 1024, 0);
  while ((rc = buzz__store_next(c->eng.store, &row, err, sizeof err)) > 0) {
    int bad = push_stored(L, &memo, &row);
    if (bad == BUZZ_EDECODE && is_strict) {
      buzz__store_query_done(c->eng.store); /* let go of the snapshot */
      *bad_id = row.id;
      lua_getfield(L, -1, "decode_error");
      lua_insert(L, -2);                  /* array, message, table */
      lua_remove(L, memo.slot);
      return n;
    }
    lua_rawseti(L, -2, ++n);
  }
  lua_remove(L, memo.slot);
  if (rc < 0) {
    lua_pop(L, 1);
    lua_pushstring(L, err);
    return BUZZ_ESTORE;
  }
  return n;
}



/* ------------------------------------------------------------ methods */

/* Pushes nil, err, "EINVAL": what (which verb the store) needs a store. */
static int push_no_store(lua_State *L, const char *what, const char *verb) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s %s the store, and this bus has none: create it "
                  "with buzz.new{ store = \"events.db\" }", what, verb);
  lua_pushliteral(L, "EINVAL");
  return 3;
}

/*
** Returns the store, or pushes nil, err, "EINVAL" for a memory bus. Reads
** see the caller's own writes: what is in flight is committed first (a
** failed group is kept for Lua to report, and the read goes on).
*/
static buzz_store *need_store(lua_State *L, lcore *c, const char *what) {
  if (c->eng.store) {
    catch_up(L, c);
    return c->eng.store;
  }
  push_no_store(L, what, "reads");
  return NULL;
}

/*
** core:query(filters, after_id, limit) -> array of events | nil, err,
** code. filters: pattern, to_id, from_ts, to_ts, key (string or
** integer). One page of stored events with id > after_id, in id order.
*/
static int lcore_query(lua_State *L) {
  lcore *c = check_core(L);
  buzz_query q;
  int64_t bad;
  luaL_checktype(L, 2, LUA_TTABLE);
  memset(&q, 0, sizeof q);
  q.after_id = buzz__check_int(L, 3, "after_id", 0, INT64_MAX);
  q.limit = buzz__check_int(L, 4, "limit", 1, BUZZ_INT_EXACT);
  q.to_id = buzz__field_int(L, 2, "to_id", 0, -1, INT64_MAX);
  q.from_ts = buzz__field_int(L, 2, "from_ts", 0, -BUZZ_INT_EXACT,
                              BUZZ_INT_EXACT);
  q.to_ts = buzz__field_int(L, 2, "to_ts", 0, -BUZZ_INT_EXACT,
                            BUZZ_INT_EXACT);
  if (!need_store(L, c, "events()")) return 3;
  lua_getfield(L, 2, "pattern");
  q.pattern.p = lua_tolstring(L, -1, &q.pattern.n);
  lua_getfield(L, 2, "key");
  if (lua_type(L, -1) == LUA_TNUMBER) {
    q.has_key = q.is_key_int = 1;
    q.key_int = buzz__check_int(L, lua_gettop(L), "key", -BUZZ_INT_EXACT,
                                BUZZ_INT_EXACT);
  } else if (lua_type(L, -1) == LUA_TSTRING) {
    q.has_key = 1;
    q.key.p = lua_tolstring(L, -1, &q.key.n);
  }
  if (buzz__lstore_read_page(L, c, &q, 0, &bad) < 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "ESTORE: %s", lua_tostring(L, -2));
    lua_pushliteral(L, "ESTORE");
    return 3;
  }
  return 1;
}

typedef struct consumers_ctx {
  lua_State *L;
  buzz_store *store;
  int n;
} consumers_ctx;

static void on_consumer(void *data, buzz_str name, buzz_str pattern,
                        int64_t acked, int64_t updated) {
  consumers_ctx *x = (consumers_ctx *)data;
  lua_State *L = x->L;
  int64_t lag = 0;
  char err[ERR_MAX];
  lua_createtable(L, 0, 5);
  lua_pushlstring(L, name.p, name.n);
  lua_setfield(L, -2, "name");
  lua_pushlstring(L, pattern.p, pattern.n);
  lua_setfield(L, -2, "pattern");
  lua_pushinteger(L, (lua_Integer)acked);
  lua_setfield(L, -2, "acked");
  lua_pushinteger(L, (lua_Integer)updated);
  lua_setfield(L, -2, "updated_ms");
  if (buzz__store_count(x->store, acked, pattern, &lag, err, sizeof err) == 0)
  {
    lua_pushinteger(L, (lua_Integer)lag);
    lua_setfield(L, -2, "lag");
  }
  lua_rawseti(L, -2, ++x->n);
}

/* core:consumers() -> array of { name, pattern, acked, updated_ms, lag } */
static int lcore_consumers(lua_State *L) {
  lcore *c = check_core(L);
  consumers_ctx x;
  char err[ERR_MAX];
  int rc;
  if (!need_store(L, c, "consumers()")) return 3;
  lua_newtable(L);
  x.L = L;
  x.store = c->eng.store;
  x.n = 0;
  err[0] = '\0';
  if ((rc = buzz__store_consumers(c->eng.store, on_consumer, &x, err,
                                  sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  return 1;
}

/*
** core:stream_version(stream) -> the stream's version in the store (the
** highest stream_version of its committed events; 0: none) | nil, err,
** code. The Lua layer asks once per stream and counts on from there
** (lua/buzz/stream.lua): this bus is the store's one writer.
*/
static int lcore_stream_version(lua_State *L) {
  lcore *c = check_core(L);
  buzz_str stream;
  char err[ERR_MAX];
  int64_t v;
  int rc;
  stream.p = luaL_checklstring(L, 2, &stream.n);
  if (!need_store(L, c, "stream_version()")) return 3;
  err[0] = '\0';
  if ((rc = buzz__store_stream_version(c->eng.store, stream, &v, err,
                                       sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  lua_pushinteger(L, (lua_Integer)v);
  return 1;
}

/*
** core:remove_consumer(name) -> true if it existed | nil, err, code. A
** consumer subscribed on this bus must be unsubscribed first.
*/
static int lcore_remove_consumer(lua_State *L) {
  lcore *c = check_core(L);
  size_t len;
  const char *name = luaL_checklstring(L, 2, &len);
  buzz_row spec, *row;
  char err[ERR_MAX];
  int64_t acked;
  int rc, found;
  if (!need_store(L, c, "remove_consumer()")) return 3;
  if (buzz__consumer_find(&c->eng.bus, name)) {
    lua_pushnil(L);
    lua_pushfstring(L, "durable consumer \"%s\" is subscribed on this "
                    "bus: unsubscribe it before removing it", name);
    lua_pushliteral(L, "EINVAL");
    return 3;
  }
  err[0] = '\0';
  if ((found = buzz__store_consumer(c->eng.store, name, len, &acked, err,
                                    sizeof err)) < 0)
    return push_store_fail(L, found, err);
  memset(&spec, 0, sizeof spec);
  spec.kind = BUZZ_ROW_DROP_CONSUMER;
  spec.type.p = name;
  spec.type.n = len;
  if ((row = buzz__row_new(&spec)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  if ((rc = buzz__store_append(c->eng.store, row)) < 0)
    return push_fail(L, rc, "the store was opened read-only");
  if ((rc = store_flush(L, c, push_refs(L), err)) < 0)
    return push_store_fail(L, rc, err);
  lua_pushboolean(L, found);
  return 1;
}

static void on_type_count(void *data, buzz_str type, int64_t n) {
  lua_State *L = (lua_State *)data;
  lua_pushlstring(L, type.p, type.n);
  lua_pushinteger(L, (lua_Integer)n);
  lua_rawset(L, -3);
}

/*
** core:store_info(with_types, with_events) -> { events, first_id,
** last_id, size_bytes, wal_bytes, appended, committed, commits, failed,
** pending_writes, committed_id, held_back, deleted, backlog_bytes,
** backlog_peak, max_backlog, refused, checkpoints, dedup_keys, types = {
** [type] = count } }. events (a pass over the log) is left out when
** with_events is given and false; types (another) is there only with
** with_types.
*/
static int lcore_store_info(lua_State *L) {
  lcore *c = check_core(L);
  buzz_store_stats st;
  int64_t count = 0, first, last, bytes, wal;
  char err[ERR_MAX];
  int rc, with_events = lua_isnoneornil(L, 3) || lua_toboolean(L, 3);
  if (!need_store(L, c, "store_info()")) return 3;
  err[0] = '\0';
  if ((rc = buzz__store_size(c->eng.store, with_events ? &count : NULL, &first,
                             &last, &bytes, &wal, err, sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  buzz__store_stats(c->eng.store, &st);
  lua_createtable(L, 0, 16);
  if (with_events) set_i(L, "events", count);
  set_i(L, "first_id", first);
  set_i(L, "last_id", last);
  set_i(L, "size_bytes", bytes);
  set_i(L, "wal_bytes", wal);
  set_i(L, "appended", st.appended);
  set_i(L, "committed", st.committed);
  set_i(L, "commits", st.commits);
  set_i(L, "failed", st.failed);
  set_i(L, "pending_writes", st.pending);
  set_i(L, "committed_id", st.committed_id);
  set_i(L, "held_back", st.held_back);
  set_i(L, "deleted", st.deleted);
  set_i(L, "backlog_bytes", st.backlog_bytes);
  set_i(L, "backlog_peak", st.backlog_peak);
  set_i(L, "max_backlog", st.backlog_limit);
  set_i(L, "refused", st.refused);
  set_i(L, "checkpoints", st.checkpoints);
  set_i(L, "dedup_keys",
        c->eng.dedup ? (int64_t)buzz__dedup_count(c->eng.dedup) : 0);
  if (lua_toboolean(L, 2)) {
    lua_newtable(L);
    if ((rc = buzz__store_types(c->eng.store, on_type_count, L, err,
                                sizeof err)) < 0)
      return push_store_fail(L, rc, err);
    lua_setfield(L, -2, "types");
  }
  return 1;
}

/*
** Hands the writer the state row spec (see buzz_row) for the store of a
** bus that has one, behind everything appended before it. A failure of
** an earlier group is returned first, as publish does, and then nothing
** is written; under sync durability it waits for the commit. Returns
** true | nil, err, code (ESTORE for a read-only store).
*/
static int state_write(lua_State *L, lcore *c, const buzz_row *spec) {
  char err[ERR_MAX];
  buzz_row *row;
  int u = push_refs(L), rc;
  if ((rc = store_sync(L, c, u, err)) < 0)
    return push_store_fail(L, rc, err);
  if ((row = buzz__row_new(spec)) == NULL)
    return push_fail(L, BUZZ_ENOMEM, NULL);
  if ((rc = buzz__store_append(c->eng.store, row)) < 0)
    return push_fail(L, rc, "the store was opened read-only");
  if (c->eng.durability == BUZZ_DUR_SYNC &&
      (rc = store_flush(L, c, u, err)) < 0)
    return push_store_fail(L, rc, err);
  lua_pushboolean(L, 1);
  return 1;
}

/*
** core:state_put(kind, name, value) -> true | nil, err, code. Sets the
** state row (kind, name) to the string value, replacing it, in order with
** the bus's other writes (the same group commit).
*/
static int lcore_state_put(lua_State *L) {
  lcore *c = check_core(L);
  buzz_row spec;
  memset(&spec, 0, sizeof spec);
  spec.kind = BUZZ_ROW_STATE_PUT;
  spec.type.p = luaL_checklstring(L, 2, &spec.type.n);
  spec.key.p = luaL_checklstring(L, 3, &spec.key.n);
  spec.payload.p = luaL_checklstring(L, 4, &spec.payload.n);
  if (c->eng.store == NULL) return push_no_store(L, "state_put()", "writes");
  return state_write(L, c, &spec);
}

/*
** core:state_del(kind, name) -> true | nil, err, code. Deletes the state
** row (kind, name), or with name nil every row of kind. Deleting what is
** not there is no error.
*/
static int lcore_state_del(lua_State *L) {
  lcore *c = check_core(L);
  buzz_row spec;
  memset(&spec, 0, sizeof spec);
  spec.kind = BUZZ_ROW_STATE_DEL;
  spec.type.p = luaL_checklstring(L, 2, &spec.type.n);
  spec.key.p = luaL_optlstring(L, 3, NULL, &spec.key.n);
  if (c->eng.store == NULL) return push_no_store(L, "state_del()", "writes");
  return state_write(L, c, &spec);
}

typedef struct state_ctx {
  lua_State *L;
  int n;
} state_ctx;

static void on_state(void *data, buzz_str name, buzz_str value) {
  state_ctx *x = (state_ctx *)data;
  lua_State *L = x->L;
  lua_createtable(L, 0, 2);
  lua_pushlstring(L, name.p ? name.p : "", name.n);
  lua_setfield(L, -2, "name");
  lua_pushlstring(L, value.p ? value.p : "", value.n);
  lua_setfield(L, -2, "value");
  lua_rawseti(L, -2, ++x->n);
}

/*
** core:state_list(kind [, name]) -> array of { name, value } | nil, err,
** code: the state rows of kind, in name order; with name, the row of that
** name alone (looked up by key), if any. Sees the bus's own writes.
*/
static int lcore_state_list(lua_State *L) {
  lcore *c = check_core(L);
  buzz_str kind, name;
  state_ctx x;
  char err[ERR_MAX];
  int rc;
  kind.p = luaL_checklstring(L, 2, &kind.n);
  name.p = luaL_optlstring(L, 3, NULL, &name.n);
  if (!need_store(L, c, "state_list()")) return 3;
  lua_newtable(L);
  x.L = L;
  x.n = 0;
  err[0] = '\0';
  if ((rc = buzz__store_state(c->eng.store, kind, name, on_state, &x, err,
                              sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  return 1;
}

static void on_state_count(void *data, buzz_str name, buzz_str value) {
  (void)name;
  (void)value;
  (*(int64_t *)data)++;
}

/*
** core:state_count(kind) -> the number of state rows of kind (retries,
** dead letters, delayed events: lua/buzz/store.lua) | nil, err, code,
** without decoding them.
*/
static int lcore_state_count(lua_State *L) {
  lcore *c = check_core(L);
  buzz_str kind, none = { NULL, 0 };
  int64_t n = 0;
  char err[ERR_MAX];
  int rc;
  kind.p = luaL_checklstring(L, 2, &kind.n);
  if (!need_store(L, c, "state_count()")) return 3;
  err[0] = '\0';
  if ((rc = buzz__store_state(c->eng.store, kind, none, on_state_count, &n, err,
                              sizeof err)) < 0)
    return push_store_fail(L, rc, err);
  lua_pushinteger(L, (lua_Integer)n);
  return 1;
}

/* The methods of this file; lbuzz.c's luaopen_buzz_core adds them to the
** core's method table. */
const luaL_Reg buzz__lstore_methods[] = {
  { "query", lcore_query },
  { "consumers", lcore_consumers },
  { "remove_consumer", lcore_remove_consumer },
  { "store_info", lcore_store_info },
  { "state_put", lcore_state_put },
  { "state_del", lcore_state_del },
  { "state_list", lcore_state_list },
  { "state_count", lcore_state_count },
  { "stream_version", lcore_stream_version },
  { NULL, NULL }
};
