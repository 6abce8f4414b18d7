/*
** jsonenc.c: Lua values to JSON text (buzz__json_encode). The rules are in
** json.c's header. The running count of printed bytes stops a value at
** max as soon as it passes it; paths name the bad value from the root.
*/
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "jsonint.h"

#define PATH_HEAD       6       /* path segments shown before a "..." */
#define PATH_TAIL       6       /* and after it */
#define PATH_KEY_MAX    32      /* key bytes shown in a path */


/* ----------------------------------------------------------- numbers */

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
    buzz__json_int_text(buf, (long long)d);
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
    buzz__json_int_text(num, (long long)f->index);
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
  buzz__json_box_drop(e->box);
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
  buzz__json_box_drop(e->box);
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
  buzz__json_box_drop(e->box);
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
  buzz__json_box_drop(e->box);
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
      buzz__json_box_drop(e->box);
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
    buzz__json_int_text(num, (long long)i);
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
        buzz__json_int_text(buf, (long long)n);
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

/* Orders two object members by key, bytewise (strcmp: keys hold no NUL). */
static int member_cmp(const void *a, const void *b) {
  const cJSON *x = *(const cJSON *const *)a, *y = *(const cJSON *const *)b;
  return strcmp(x->string, y->string);
}

/*
** Puts the members of every object under node in key order, relinking
** cJSON's child list (each child's prev is its predecessor, the first
** one's the last child). Keys are unique (they come from one Lua table),
** so the order is total. Returns 0, or BUZZ_ENOMEM with the tree intact.
*/
static int sort_tree(cJSON *node) {
  cJSON *c, **v;
  size_t n = 0, i;
  int rc;
  for (c = node->child; c != NULL; c = c->next) {
    n++;
    if ((c->type & (cJSON_Object | cJSON_Array)) && (rc = sort_tree(c)) != 0)
      return rc;
  }
  if (!(node->type & cJSON_Object) || n < 2) return 0;
  if ((v = malloc(n * sizeof *v)) == NULL) return BUZZ_ENOMEM;
  for (i = 0, c = node->child; c != NULL; c = c->next) v[i++] = c;
  qsort(v, n, sizeof *v, member_cmp);
  for (i = 0; i < n; i++) {
    v[i]->prev = i == 0 ? v[n - 1] : v[i - 1];
    v[i]->next = i + 1 < n ? v[i + 1] : NULL;
  }
  node->child = v[0];
  free(v);
  return 0;
}

static int encode(lua_State *L, int idx, const char *root, size_t max,
                  int is_sorted) {
  int top = lua_gettop(L), rc;
  encoder e;
  frame f;
  idx = buzz_absindex(L, idx);
  luaL_checkstack(L, 8, NULL);
  e.L = L;
  e.root = root;
  e.box = buzz__json_box_acquire(L);                               /* at top + 1 */
  e.size = 0;
  e.max = max;
  f.up = NULL; f.table = NULL; f.key = NULL; f.klen = 0; f.index = 0;
  f.depth = 0;
  rc = encode_value(&e, idx, NULL, &f);
  if (rc == 0 && is_sorted && e.box->tree != NULL &&
      sort_tree(e.box->tree) != 0)
    rc = fail_nomem(&e);
  if (rc == 0 && e.size > (size_t)INT_MAX - 5) {
    buzz__json_box_drop(e.box);                      /* cJSON prints up to INT_MAX */
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
  buzz__json_box_release(e.box);
  buzz__json_settle(L, top);
  return rc;
}

int buzz__json_encode(lua_State *L, int idx, const char *root, size_t max) {
  return encode(L, idx, root, max, 0);
}

int buzz__json_canonical(lua_State *L, int idx, const char *root) {
  return encode(L, idx, root, 0, 1);
}
