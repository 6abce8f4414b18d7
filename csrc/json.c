/*
** json.c: Lua values to JSON text and back, with cJSON.
**
** The event store keeps payloads and headers as JSON, so this file refuses
** anything JSON cannot hold exactly rather than guess:
**   - tables are arrays when their keys are exactly 1..n, objects when all
**     keys are strings; {} is an object. Mixed tables, arrays with holes,
**     other keys, cycles and nesting deeper than 1000 are refused;
**   - integers are written exactly and refused beyond 2^53 - 1 (readers
**     hold JSON numbers as doubles, and 2^53 + 1 reads as 2^53: the range
**     is JavaScript's safe integers); other numbers are written in the
**     shortest form that reads back as the same double; NaN and inf are
**     refused. Decoding gives integers for integral numbers in that range
**     (on LuaJIT, numbers anyway) and floats for the rest, -0 included;
**   - strings pass through byte for byte, but a NUL byte is refused (cJSON
**     strings end at NUL), and so is \u0000 when decoding;
**   - the light userdata NULL (core.null) is JSON null. Decoding gives it
**     back in arrays, so [1,null,3] keeps its length; in objects a null
**     member is simply absent, and a null text decodes to nil.
** Error messages name the path of the bad value from the root name the
** caller gives: 'payload.items[3].cb: functions cannot be encoded as JSON'.
**
** Both directions build a cJSON tree. cJSON's own number printer is not
** exact (it accepts %1.15g when it is within an epsilon, so 0.1 + 0.2
** prints as 0.3), so numbers go into the tree as raw text written here.
** Measured on a small payload, the tree costs about 1.6x a writer straight
** into a Lua buffer; the issue asks for cJSON and that is under the 2x we
** allowed, so the tree stays. While it grows, the encoder counts the
** bytes it will print as, exactly (cJSON's escapes), and stops at the
** caller's limit: a value far above it (a table holding the same table
** twice at each of 30 levels is gigabytes of text) is refused after at
** most the limit's worth of tree, and the count sizes the print buffer.
** Nesting deeper than 1000 levels is refused as it is reached.
**
** Memory: a cJSON tree and a printed text are malloc'd. While a call holds
** them they are owned by a "box" userdata on the Lua stack whose __gc frees
** them, so a Lua memory error raised meanwhile leaks nothing. The box is
** reused through the registry; a call that finds it busy (a __gc
** metamethod run by the collector may call json_encode from inside
** another call) or left busy by a raise makes a fresh one and registers
** that instead. The tree is freed before an error message is built.
**
** Not done: key order of objects follows next(), so equal tables may
** print their keys in different orders; metatables are ignored (no
** __tojson); an empty table cannot be told from an empty array. cJSON's
** parser is lax in a few places (it reads 01, 1. and raw control bytes
** inside strings); duplicate keys: the last one wins.
*/
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "json.h"

#define JSON_MAX_DEPTH  1000                   /* cJSON's parse limit */
#define JSON_MAX_SAFE   9007199254740991.0     /* 2^53 - 1 */
#define PATH_HEAD       6       /* path segments shown before a "..." */
#define PATH_TAIL       6       /* and after it */
#define PATH_KEY_MAX    32      /* key bytes shown in a path */

#define BOX_MT  "buzz.json_box"


/* ---------------------------------------------------------------- box */

/*
** Owner of the malloc'd memory of one call, so a raise cannot leak it.
** CONSTRUCTOR: box_acquire()   DESTRUCTOR: box_gc() (the collector)
*/
typedef struct json_box {
  cJSON *tree;   /* owns; NULL between calls */
  char *text;    /* owns (cJSON_PrintUnformatted); NULL between calls */
  int busy;      /* 1 while a call uses the box */
  char small[1024];  /* the text when it fits: no malloc */
} json_box;

/* The registry key of the shared box: its address is unique. */
static const char box_key = 0;

/* Frees what the box owns. Never raises. */
static void box_drop(json_box *b) {
  if (b->tree != NULL) {
    cJSON_Delete(b->tree);
    b->tree = NULL;
  }
  if (b->text != NULL) {
    if (b->text != b->small) cJSON_free(b->text);
    b->text = NULL;
  }
}

static int box_gc(lua_State *L) {
  box_drop((json_box *)lua_touserdata(L, 1));
  return 0;
}

/*
** Pushes a box for one call and marks it busy. Reuses the shared box when
** it is idle; otherwise makes a fresh one and registers it in its place
** (a busy box is either in use further down the C stack, where its caller
** keeps it on the Lua stack, or was left busy by a raise and will be
** collected). Raises only on memory errors.
*/
static json_box *box_acquire(lua_State *L) {
  json_box *b;
  lua_pushlightuserdata(L, (void *)&box_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  b = (json_box *)lua_touserdata(L, -1);
  if (b == NULL || b->busy) {
    lua_pop(L, 1);
    b = (json_box *)buzz_newud(L, sizeof *b);
    b->tree = NULL;
    b->text = NULL;
    b->busy = 0;
    if (luaL_newmetatable(L, BOX_MT)) {
      lua_pushcfunction(L, box_gc);
      lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_pushlightuserdata(L, (void *)&box_key);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
  b->busy = 1;
  return b;
}

/* Frees what the box owns and lets the next call have it. */
static void box_release(json_box *b) {
  box_drop(b);
  b->busy = 0;
}

/*
** Leaves only the value on top of the stack above top: the result or the
** message of a call that pushed a box and maybe scratch values at top + 1.
*/
static void settle(lua_State *L, int top) {
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
}


/* ----------------------------------------------------------- numbers */

/* Writes the decimal digits of v into buf; returns the length. */
static int int_text(char *buf, long long v) {
  char tmp[24];
  unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v
                               : (unsigned long long)v;
  int i = 0, n = 0;
  do {
    tmp[i++] = (char)('0' + (int)(u % 10));
    u /= 10;
  } while (u != 0);
  if (v < 0) buf[n++] = '-';
  while (i > 0) buf[n++] = tmp[--i];
  buf[n] = '\0';
  return n;
}

/*
** Replaces the locale's decimal point (one or more bytes) in printf output
** with '.'.
*/
static void fix_point(char *s) {
  char *w = s;
  int seen = 0;
  for (; *s != '\0'; s++) {
    char c = *s;
    if ((c >= '0' && c <= '9') || c == '-' || c == '+' || c == 'e' ||
        c == 'E') {
      *w++ = c;
    } else if (!seen) {
      *w++ = '.';
      seen = 1;
    }
  }
  *w = '\0';
}

/*
** Writes the JSON text of the finite double d into buf (32 bytes):
** integral values within 2^53 - 1 as integers, others in the shortest %g
** form that reads back as d.
*/
static void double_text(char *buf, double d) {
  int prec;
  if (d == floor(d) && fabs(d) <= JSON_MAX_SAFE && !(d == 0 && signbit(d))) {
    int_text(buf, (long long)d);
    return;
  }
  for (prec = 15; prec < 17; prec++) {
    snprintf(buf, 32, "%.*g", prec, d);
    if (strtod(buf, NULL) == d) break;
  }
  if (prec == 17) snprintf(buf, 32, "%.17g", d);
  fix_point(buf);
}


/* -------------------------------------------------------------- paths */

/*
** One step of the path from the root to the value being encoded. Frames
** live on the C stack of encode_value(), one per level.
*/
typedef struct frame {
  const struct frame *up;  /* the parent; NULL at the root */
  const void *table;       /* the table encoded at this level, or NULL */
  const char *key;         /* borrows from the parent table; NULL: index */
  size_t klen;
  lua_Integer index;       /* the array index when key is NULL */
  int depth;               /* 0 at the root */
} frame;

static int is_ident(const char *s, size_t len) {
  size_t i;
  if (len == 0 || (s[0] >= '0' && s[0] <= '9')) return 0;
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '_'))
      return 0;
  }
  return 1;
}

/* Adds ["key"] to b, escaped as in JSON and cut after PATH_KEY_MAX bytes. */
static void add_quoted_key(luaL_Buffer *b, const char *s, size_t len) {
  size_t i, n = len;
  if (n > PATH_KEY_MAX) {
    n = PATH_KEY_MAX;
    /* do not cut a UTF-8 sequence */
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) n--;
  }
  luaL_addstring(b, "[\"");
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[8];
    if (c == '"' || c == '\\') {
      luaL_addchar(b, '\\');
      luaL_addchar(b, (char)c);
    } else if (c == '\n') {
      luaL_addstring(b, "\\n");
    } else if (c == '\t') {
      luaL_addstring(b, "\\t");
    } else if (c < 0x20 || c == 0x7F) {
      snprintf(esc, sizeof esc, "\\u%04x", c);
      luaL_addstring(b, esc);
    } else {
      luaL_addchar(b, (char)c);
    }
  }
  if (n < len) luaL_addstring(b, "...");
  luaL_addstring(b, "\"]");
}

static void add_segment(luaL_Buffer *b, const frame *f, int first) {
  if (f->key == NULL) {
    char num[32];
    int_text(num, (long long)f->index);
    luaL_addchar(b, '[');
    luaL_addstring(b, num);
    luaL_addchar(b, ']');
  } else if (f->klen <= PATH_KEY_MAX && is_ident(f->key, f->klen)) {
    if (!first) luaL_addchar(b, '.');
    luaL_addlstring(b, f->key, f->klen);
  } else {
    add_quoted_key(b, f->key, f->klen);
  }
}

/*
** Pushes the path of f, such as 'payload.items[3]["two words"]'. Paths
** deeper than PATH_HEAD + PATH_TAIL show their ends around a "...".
*/
#if defined(__GNUC__)
__attribute__((noinline))                /* its buffer: see fail_mixed */
#endif
static void push_path(lua_State *L, const char *root, const frame *f) {
  const frame *seg[PATH_HEAD + PATH_TAIL];
  int n = f->depth, shown = 0, i;
  int cut = n > PATH_HEAD + PATH_TAIL;
  luaL_Buffer b;
  for (; f->up != NULL; f = f->up) {
    int d = f->depth;                               /* 1..n */
    if (!cut) seg[d - 1] = f;
    else if (d <= PATH_HEAD) seg[d - 1] = f;
    else if (d > n - PATH_TAIL) seg[PATH_HEAD + d - (n - PATH_TAIL) - 1] = f;
  }
  luaL_checkstack(L, 6, NULL);
  luaL_buffinit(L, &b);
  luaL_addstring(&b, root);
  for (i = 0; i < (cut ? PATH_HEAD + PATH_TAIL : n); i++) {
    if (cut && i == PATH_HEAD) luaL_addstring(&b, "...");
    add_segment(&b, seg[i], *root == '\0' && shown++ == 0);
  }
  luaL_pushresult(&b);
}


/* ------------------------------------------------------------- encode */

typedef struct encoder {
  lua_State *L;
  json_box *box;     /* borrows; on the stack of buzz__json_encode() */
  const char *root;  /* the name of the root value in messages */
  size_t size;       /* bytes the text of the tree so far prints as */
  size_t max;        /* the limit on size; 0: none */
} encoder;

/*
** The bytes cJSON prints for the len bytes at s as a JSON string, quotes
** included: '"', '\\' and \b \f \n \r \t take two bytes, the other
** bytes below 0x20 six (\u00XX), every other byte one (cJSON 1.7's
** print_string_ptr). Sets *has_nul when s holds a NUL byte.
*/
static size_t string_size(const char *s, size_t len, int *has_nul) {
  size_t i, n = len + 2;
  *has_nul = 0;
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    if (c == '"' || c == '\\' || c == '\b' || c == '\f' || c == '\n' ||
        c == '\r' || c == '\t')
      n += 1;
    else
      n += 5;
    if (c == 0) *has_nul = 1;
  }
  return n;
}

/*
** Frees the tree, then pushes "<path of f>: <message>" and returns
** BUZZ_EINVAL. The format takes what lua_pushfstring() takes.
*/
static int fail(encoder *e, const frame *f, const char *fmt, ...) {
  lua_State *L = e->L;
  va_list ap;
  box_drop(e->box);
  luaL_checkstack(L, 4, NULL);
  push_path(L, e->root, f);
  lua_pushliteral(L, ": ");
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  lua_concat(L, 3);
  return BUZZ_EINVAL;
}

static int fail_nomem(encoder *e) {
  box_drop(e->box);
  lua_pushliteral(e->L, "out of memory");
  return BUZZ_ENOMEM;
}

/*
** Frees the tree, pushes "<root> is above the limit of M bytes as JSON
** (encoding stopped at N bytes)" and returns BUZZ_ETOOBIG. N is what the
** tree built so far prints as: the whole text would be longer still.
*/
static int fail_too_big(encoder *e) {
  char msg[160];
  box_drop(e->box);
  snprintf(msg, sizeof msg, "is above the limit of %lu bytes as JSON "
           "(encoding stopped at %lu bytes)", (unsigned long)e->max,
           (unsigned long)e->size);
  lua_pushfstring(e->L, "%s %s", e->root, msg);
  return BUZZ_ETOOBIG;
}

/*
** Links item, which prints as bytes bytes, under parent (the root when
** parent is NULL) with the key or index of f, and counts what the text
** grows by: item, its comma, its quoted key and colon. Takes item even
** when it fails; fails with ETOOBIG as soon as the count passes e->max,
** so a value far above the limit (a table holding the same table twice
** at each of 30 levels prints as gigabytes) costs no more than the limit
** to refuse.
*/
static int attach(encoder *e, cJSON *parent, const frame *f, cJSON *item,
                  size_t bytes) {
  if (item == NULL) return fail_nomem(e);
  if (parent == NULL) {
    e->box->tree = item;
  } else {
    if (parent->child != NULL) bytes += 1;               /* the comma */
    if (f->key == NULL) {
      cJSON_AddItemToArray(parent, item);
    } else {
      int has_nul;
      bytes += string_size(f->key, f->klen, &has_nul) + 1;  /* "key": */
      cJSON_AddItemToObjectCS(parent, f->key, item);
    }
  }
  e->size += bytes;
  if (e->max > 0 && e->size > e->max) return fail_too_big(e);
  return 0;
}

/* Writes a short description of the key at idx, for messages. */
static void describe_key(lua_State *L, int idx, char *buf, size_t size) {
  int t = lua_type(L, idx);
  if (t == LUA_TNUMBER) {
#if LUA_VERSION_NUM >= 503
    if (lua_isinteger(L, idx)) {
      snprintf(buf, size, "key %lld", (long long)lua_tointeger(L, idx));
      return;
    }
#endif
    snprintf(buf, size, "key %.14g", (double)lua_tonumber(L, idx));
  } else if (t == LUA_TBOOLEAN) {
    snprintf(buf, size, "key %s", lua_toboolean(L, idx) ? "true" : "false");
  } else {
    snprintf(buf, size, "a %s key", lua_typename(L, t));
  }
}

/*
** If the key at idx is a positive integer, stores it in *i and returns 1.
** Lua 5.4 turns integral float keys into integers; LuaJIT has only
** doubles, so integral ones count there.
*/
static int positive_int_key(lua_State *L, int idx, lua_Integer *i) {
  double d;
#if LUA_VERSION_NUM >= 503
  if (lua_isinteger(L, idx)) {
    *i = lua_tointeger(L, idx);
    return *i >= 1;
  }
#endif
  d = (double)lua_tonumber(L, idx);
  if (d >= 1 && d < 9223372036854775808.0 && d == floor(d)) {
    *i = (lua_Integer)d;
    return 1;
  }
  return 0;
}

static int encode_value(encoder *e, int idx, cJSON *parent, frame *f);

/*
** The error for a table with both integer and string keys. A function of
** its own, never inlined, because its luaL_Buffer is LUAL_BUFFERSIZE bytes
** (8 KiB on LuaJIT): inside encode_table it would sit in every level's
** frame, and 1000 nested levels would take 8 MiB of C stack.
*/
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static int fail_mixed(encoder *e, const frame *f, lua_Integer first_int,
                      const char *first_str, size_t first_len) {
  lua_State *L = e->L;
  luaL_Buffer b;
  int rc;
  box_drop(e->box);
  luaL_checkstack(L, 6, NULL);
  luaL_buffinit(L, &b);
  add_quoted_key(&b, first_str, first_len);
  luaL_pushresult(&b);
  lua_pushinteger(L, first_int);
  rc = fail(e, f, "table mixes integer keys ([%s]) and string keys (%s); "
            "JSON would lose keys", lua_tostring(L, -1), lua_tostring(L, -2));
  lua_replace(L, -3);
  lua_pop(L, 1);
  return rc;
}

/*
** Encodes the table at idx: an array when its keys are exactly 1..n, an
** object when they are all strings (or it is empty). Uses 3 stack slots
** per level.
*/
static int encode_table(encoder *e, int idx, cJSON *parent, frame *f) {
  lua_State *L = e->L;
  const void *t = lua_topointer(L, idx);
  const frame *a;
  lua_Integer nint = 0, maxint = 0, i, first_int = 0;
  const char *first_str = NULL;
  size_t first_len = 0;
  cJSON *node;
  int rc;
  for (a = f->up; a != NULL; a = a->up) {
    if (a->table == t) {
      box_drop(e->box);
      luaL_checkstack(L, 2, NULL);
      push_path(L, e->root, a);
      rc = fail(e, f, "table refers to itself (cycle back to %s)",
                lua_tostring(L, -1));
      lua_remove(L, -2);
      return rc;
    }
  }
  if (f->depth >= JSON_MAX_DEPTH)
    return fail(e, f, "tables nest deeper than %d levels", JSON_MAX_DEPTH);
  f->table = t;
  luaL_checkstack(L, 3, "json: tables nest too deeply");
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING) {
      if (first_str == NULL) first_str = lua_tolstring(L, -1, &first_len);
    } else if (lua_type(L, -1) == LUA_TNUMBER &&
               positive_int_key(L, -1, &i)) {
      if (nint++ == 0) first_int = i;
      if (i > maxint) maxint = i;
    } else {
      char what[64];
      describe_key(L, -1, what, sizeof what);
      return fail(e, f, "table has %s; JSON keys must be strings, array "
                  "indexes 1..n", what);
    }
  }
  if (nint > 0 && first_str != NULL)
    return fail_mixed(e, f, first_int, first_str, first_len);
  if (nint != maxint) {
    char num[32];
    /* nint keys in 1..maxint, maxint > nint: one of 1..nint+1 is free */
    for (i = 1; i <= nint; i++) {
      int absent;
      lua_rawgeti(L, idx, i);
      absent = lua_isnil(L, -1);
      lua_pop(L, 1);
      if (absent) break;
    }
    int_text(num, (long long)i);
    return fail(e, f, "array has a hole: [%s] is missing (use null to "
                "fill holes)", num);
  }
  if (nint > 0) {
    node = cJSON_CreateArray();
    if ((rc = attach(e, parent, f, node, 2)) != 0) return rc;
    for (i = 1; i <= nint; i++) {
      frame c;
      c.up = f; c.table = NULL; c.key = NULL; c.klen = 0; c.index = i;
      c.depth = f->depth + 1;
      lua_rawgeti(L, idx, i);
      if ((rc = encode_value(e, lua_gettop(L), node, &c)) != 0) return rc;
      lua_pop(L, 1);
    }
    return 0;
  }
  node = cJSON_CreateObject();
  if ((rc = attach(e, parent, f, node, 2)) != 0) return rc;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    frame c;
    c.up = f; c.table = NULL; c.index = 0; c.depth = f->depth + 1;
    c.key = lua_tolstring(L, -2, &c.klen);        /* a string: no change */
    if (memchr(c.key, '\0', c.klen) != NULL)
      return fail(e, &c, "keys with a NUL byte cannot be encoded as JSON");
    if ((rc = encode_value(e, lua_gettop(L), node, &c)) != 0) return rc;
    lua_pop(L, 1);
  }
  return 0;
}

/*
** Encodes the value at idx (absolute) as a child of parent, or as the root
** when parent is NULL. f holds its path. On failure the message is on top
** and the stack below it is left as it was at the failure.
*/
static int encode_value(encoder *e, int idx, cJSON *parent, frame *f) {
  lua_State *L = e->L;
  cJSON *item;
  size_t bytes;
  switch (lua_type(L, idx)) {
    case LUA_TNIL:
      item = cJSON_CreateNull();
      bytes = 4;
      break;
    case LUA_TBOOLEAN:
      item = cJSON_CreateBool(lua_toboolean(L, idx));
      bytes = lua_toboolean(L, idx) ? 4 : 5;
      break;
    case LUA_TNUMBER: {
      char buf[32];
      double d;
#if LUA_VERSION_NUM >= 503
      if (lua_isinteger(L, idx)) {
        lua_Integer n = lua_tointeger(L, idx);
        int_text(buf, (long long)n);
        if (n > (lua_Integer)JSON_MAX_SAFE || n < -(lua_Integer)JSON_MAX_SAFE)
          return fail(e, f, "integer %s is beyond 2^53 - 1, which JSON "
                      "readers cannot hold exactly; send it as a string",
                      buf);
        item = cJSON_CreateRaw(buf);
        bytes = strlen(buf);
        break;
      }
#endif
      d = (double)lua_tonumber(L, idx);
      if (d != d) return fail(e, f, "NaN cannot be encoded as JSON");
      if (isinf(d))
        return fail(e, f, "%s cannot be encoded as JSON",
                    d > 0 ? "inf" : "-inf");
      double_text(buf, d);
      item = cJSON_CreateRaw(buf);
      bytes = strlen(buf);
      break;
    }
    case LUA_TSTRING: {
      size_t len;
      int has_nul;
      const char *s = lua_tolstring(L, idx, &len);
      bytes = string_size(s, len, &has_nul);
      if (has_nul)
        return fail(e, f, "strings with a NUL byte cannot be encoded as "
                    "JSON (encode binary data as base64 or hex)");
      item = cJSON_CreateStringReference(s);   /* the table keeps s */
      break;
    }
    case LUA_TTABLE:
      return encode_table(e, idx, parent, f);
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, idx) == NULL) {           /* core.null */
        item = cJSON_CreateNull();
        bytes = 4;
        break;
      }
      return fail(e, f, "light userdata cannot be encoded as JSON (only "
                  "null)");
    case LUA_TFUNCTION:
      return fail(e, f, "functions cannot be encoded as JSON");
    case LUA_TTHREAD:
      return fail(e, f, "threads cannot be encoded as JSON");
    default:
      return fail(e, f, "%s cannot be encoded as JSON",
                  luaL_typename(L, idx));
  }
  return attach(e, parent, f, item, bytes);
}

int buzz__json_encode(lua_State *L, int idx, const char *root, size_t max) {
  int top = lua_gettop(L), rc;
  encoder e;
  frame f;
  idx = buzz_absindex(L, idx);
  luaL_checkstack(L, 8, NULL);
  e.L = L;
  e.root = root;
  e.box = box_acquire(L);                               /* at top + 1 */
  e.size = 0;
  e.max = max;
  f.up = NULL; f.table = NULL; f.key = NULL; f.klen = 0; f.index = 0;
  f.depth = 0;
  rc = encode_value(&e, idx, NULL, &f);
  if (rc == 0 && e.size > (size_t)INT_MAX - 5) {
    box_drop(e.box);                      /* cJSON prints up to INT_MAX */
    lua_pushfstring(L, "%s is above the %d bytes cJSON can print", root,
                    INT_MAX - 5);
    rc = BUZZ_ETOOBIG;
  } else if (rc == 0) {
    size_t len;
    /* the size is exact; cJSON asks for 5 bytes to spare */
    if (e.size + 5 <= sizeof e.box->small &&
        cJSON_PrintPreallocated(e.box->tree, e.box->small,
                                (int)sizeof e.box->small, 0))
      e.box->text = e.box->small;
    else
      e.box->text = cJSON_PrintBuffered(e.box->tree, (int)(e.size + 5), 0);
    cJSON_Delete(e.box->tree);
    e.box->tree = NULL;
    if (e.box->text == NULL) {
      rc = fail_nomem(&e);
    } else if ((len = strlen(e.box->text)) > max && max > 0) {
      e.size = len;                       /* not reached: size is exact */
      rc = fail_too_big(&e);
    } else {
      lua_pushlstring(L, e.box->text, len);  /* box owns text if it raises */
    }
  }
  box_release(e.box);
  settle(L, top);
  return rc;
}


/* ------------------------------------------------------------- decode */

/*
** Returns the offset of the first \u0000 escape in s, or len. Outside
** strings a backslash is a syntax error anyway, so every backslash starts
** an escape and the one after it is never the start of one.
*/
static size_t find_nul_escape(const char *s, size_t len) {
  const char *p = s, *end = s + len;
  while ((p = memchr(p, '\\', (size_t)(end - p))) != NULL) {
    if (end - p >= 6 && p[1] == 'u' && memcmp(p + 2, "0000", 4) == 0)
      return (size_t)(p - s);
    p += 2;
    if (p >= end) break;
  }
  return len;
}

/* Returns how deep arrays and objects nest at offset at of s. */
static int depth_at(const char *s, size_t at) {
  size_t i;
  int depth = 0, in_string = 0;
  for (i = 0; i < at; i++) {
    char c = s[i];
    if (in_string) {
      if (c == '\\') i++;
      else if (c == '"') in_string = 0;
    } else if (c == '"') {
      in_string = 1;
    } else if (c == '[' || c == '{') {
      depth++;
    } else if (c == ']' || c == '}') {
      depth--;
    }
  }
  return depth;
}

static int is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Pushes "invalid JSON at byte offset N near '...': why". */
static void push_syntax_error(lua_State *L, const char *s, size_t len,
                              size_t at, const char *why) {
  char near[64], num[32];
  size_t i, n = 0;
  for (i = at; i < len && i < at + 12; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c < 0x7F && c != '\'') {
      near[n++] = (char)c;
    } else {
      snprintf(near + n, sizeof near - n, "\\x%02X", c);
      n += 4;
    }
  }
  near[n] = '\0';
  int_text(num, (long long)at);
  if (at >= len)
    lua_pushfstring(L, "invalid JSON at byte offset %s (the end): %s", num,
                    why);
  else
    lua_pushfstring(L, "invalid JSON at byte offset %s near '%s%s': %s",
                    num, near, i < len ? "..." : "", why);
}

/*
** Pushes the Lua value of n: nil for a null at the root, core.null for
** one in an array. Uses 3 stack slots per level, checked per array or
** object (a scalar takes the slot its container checked, or at the root
** one of buzz__json_decode's); cJSON's parser allows JSON_MAX_DEPTH
** levels. Tables are made at their final size (cJSON counts the
** children), so none is ever rehashed. Returns 0, or BUZZ_EINVAL with the tree freed
** and a message on top.
*/
static int decode_node(lua_State *L, json_box *box, const cJSON *n) {
  const cJSON *c;
  int rc;
  switch (n->type & 0xFF) {
    case cJSON_NULL:
      if (n == box->tree) lua_pushnil(L);
      else lua_pushlightuserdata(L, NULL);
      return 0;
    case cJSON_False:
      lua_pushboolean(L, 0);
      return 0;
    case cJSON_True:
      lua_pushboolean(L, 1);
      return 0;
    case cJSON_Number: {
      double d = n->valuedouble;
      if (isinf(d)) {
        box_drop(box);
        lua_pushliteral(L, "invalid JSON: a number is out of range "
                        "(beyond +-1.8e308)");
        return BUZZ_EINVAL;
      }
      if (d == floor(d) && fabs(d) <= JSON_MAX_SAFE &&
          !(d == 0 && signbit(d)))
        lua_pushinteger(L, (lua_Integer)d);
      else
        lua_pushnumber(L, (lua_Number)d);
      return 0;
    }
    case cJSON_String:
      lua_pushstring(L, n->valuestring);
      return 0;
    case cJSON_Array: {
      int i = 0;
      luaL_checkstack(L, 3, "json: arrays and objects nest too deeply");
      lua_createtable(L, cJSON_GetArraySize(n), 0);
      for (c = n->child; c != NULL; c = c->next) {
        if ((rc = decode_node(L, box, c)) != 0) return rc;
        lua_rawseti(L, -2, ++i);
      }
      return 0;
    }
    case cJSON_Object:
      luaL_checkstack(L, 3, "json: arrays and objects nest too deeply");
      lua_createtable(L, 0, cJSON_GetArraySize(n));
      for (c = n->child; c != NULL; c = c->next) {
        lua_pushstring(L, c->string);
        if (cJSON_IsNull(c)) lua_pushnil(L);           /* a later dup wins */
        else if ((rc = decode_node(L, box, c)) != 0) return rc;
        lua_rawset(L, -3);
      }
      return 0;
    default:                              /* the parser makes no others */
      box_drop(box);
      lua_pushliteral(L, "invalid JSON: unexpected cJSON node");
      return BUZZ_EINVAL;
  }
}

int buzz__json_decode(lua_State *L, const char *s, size_t len) {
  int top = lua_gettop(L), rc = BUZZ_EINVAL;
  const char *end = NULL;
  size_t at, i;
  json_box *box;
  luaL_checkstack(L, 8, NULL);
  box = box_acquire(L);                                 /* at top + 1 */
  for (i = 0; i < len && is_space(s[i]); i++) {}
  if (i == len) {
    lua_pushliteral(L, "invalid JSON: the text is empty");
  } else if ((at = find_nul_escape(s, len)) < len) {
    push_syntax_error(L, s, len, at, "strings with \\u0000 (NUL) are not "
                      "supported");
  } else {
    /* The end pointer, not cJSON_GetErrorPtr(): that is a global. */
    box->tree = cJSON_ParseWithLengthOpts(s, len, &end, 0);
    if (box->tree == NULL) {
      at = end != NULL ? (size_t)(end - s) : 0;
      push_syntax_error(L, s, len, at,
                        depth_at(s, at) >= JSON_MAX_DEPTH ?
                        "arrays and objects nest deeper than 1000 levels" :
                        at > 0 && at + 1 >= len ?
                        "syntax error, or the text is cut short" :
                        "syntax error");
    } else {
      at = (size_t)(end - s);
      while (at < len && is_space(s[at])) at++;
      if (at < len) {
        box_drop(box);
        push_syntax_error(L, s, len, at, "unexpected text after the value");
      } else {
        rc = decode_node(L, box, box->tree);
      }
    }
  }
  box_release(box);
  settle(L, top);
  return rc;
}


/* ---------------------------------------------------------- Lua API */

/* Returns nil, "CODE: message", "CODE" for the message on top. */
static int push_fail(lua_State *L, int rc) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", buzz__err_name(rc), lua_tostring(L, -2));
  lua_pushstring(L, buzz__err_name(rc));
  return 3;
}

/* core.json_encode(value [, max]) -> text | nil, message, code */
static int ljson_encode(lua_State *L) {
  lua_Integer max;
  int rc;
  luaL_checkany(L, 1);
  max = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, max >= 0, 2, "max must be >= 0 bytes (0 = no limit)");
  rc = buzz__json_encode(L, 1, "value", (size_t)max);
  return rc == 0 ? 1 : push_fail(L, rc);
}

/*
** Bytes of the UTF-8 character at s (n > 0 bytes left, s[0] >= 0x80), or
** 0 when they are not one (RFC 3629: no overlong forms, no surrogates,
** nothing above U+10FFFF).
*/
static size_t utf8_char(const unsigned char *s, size_t n) {
  unsigned char c = s[0], lo = 0x80, hi = 0xBF;
  size_t len, i;
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c >= 0xE0 && c <= 0xEF) len = 3;
  else if (c >= 0xF0 && c <= 0xF4) len = 4;
  else return 0;
  if (c == 0xE0) lo = 0xA0;
  else if (c == 0xED) hi = 0x9F;
  else if (c == 0xF0) lo = 0x90;
  else if (c == 0xF4) hi = 0x8F;
  if (n < len || s[1] < lo || s[1] > hi) return 0;
  for (i = 2; i < len; i++)
    if (s[i] < 0x80 || s[i] > 0xBF) return 0;
  return len;
}

/*
** core.json_text(s [, limit]) -> s as text JSON (and every reader of it)
** can hold: a NUL byte as \0, each byte that is not part of a UTF-8
** character as \xHH, and, past limit bytes (default 65536; 0: none),
** cut there with "... [truncated N bytes]" (N: the bytes of s left out;
** never inside a character or an escape). Text that needs none of it is
** returned as it is. For error text a store must always be able to keep
** (lua/buzz/storable.lua); a C loop, as a Lua pattern costs ~200
** instructions a byte.
*/
static int ljson_text(lua_State *L) {
  size_t n, i = 0, out = 0, limit;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  lua_Integer lim = luaL_optinteger(L, 2, 65536);
  luaL_Buffer b;
  luaL_argcheck(L, lim >= 0, 2, "limit must be >= 0 bytes (0 = no limit)");
  limit = lim == 0 ? (size_t)-1 : (size_t)lim;
  while (i < n && s[i] != 0) {                 /* the clean prefix */
    size_t w = s[i] < 0x80 ? 1 : utf8_char(s + i, n - i);
    if (w == 0) break;
    i += w;
  }
  if (i == n && n <= limit) {
    lua_settop(L, 1);
    return 1;
  }
  luaL_buffinit(L, &b);
  i = 0;
  while (i < n) {
    char esc[8];
    size_t w = s[i] < 0x80 ? 1 : utf8_char(s + i, n - i);
    const char *piece = (const char *)s + i;
    size_t len = w;
    if (s[i] == 0) {
      piece = "\\0";
      w = 1;
      len = 2;
    } else if (w == 0) {
      snprintf(esc, sizeof esc, "\\x%02X", s[i]);
      piece = esc;
      w = 1;
      len = 4;
    }
    if (out + len > limit) break;
    luaL_addlstring(&b, piece, len);
    out += len;
    i += w;
  }
  if (i < n) {
    char mark[64];
    snprintf(mark, sizeof mark, "... [truncated %lu bytes]",
             (unsigned long)(n - i));
    luaL_addstring(&b, mark);
  }
  luaL_pushresult(&b);
  return 1;
}

/* core.json_decode(text) -> value | nil, message, "EINVAL" */
static int ljson_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int rc = buzz__json_decode(L, s, len);
  return rc == 0 ? 1 : push_fail(L, rc);
}

void buzz__json_register(lua_State *L) {
  lua_pushcfunction(L, ljson_encode);
  lua_setfield(L, -2, "json_encode");
  lua_pushcfunction(L, ljson_decode);
  lua_setfield(L, -2, "json_decode");
  lua_pushcfunction(L, ljson_text);
  lua_setfield(L, -2, "json_text");
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
}
