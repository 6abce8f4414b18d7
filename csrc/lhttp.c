/*
** lhttp.c: the binding of http.c (bus:serve's server) and the HMAC and
** SHA-256 functions the gateway verifies webhooks with (OpenSSL's
** libcrypto).
**
** core:serve(host, port, limits) -> a "buzz.http" userdata on the core's
** loop. Its methods:
**   srv:next() -> "request", conn, method, url, headers, body,
**                 keep_alive, peer | "closed", conn | nil
**     (headers: a table by lower-case name; repeated fields joined
**     with ", ")
**   srv:write(conn, bytes [, flags]) -> true | nil, code
**     (flags: a string of "e" end of response, "c" close after,
**     "f" past the buffer limit; code "EFULL" or "ECLOSED")
**   srv:queued(conn), srv:count(), srv:port(), srv:close()
** The core closes its servers when it closes (lcore.h: servers), so a
** server never outlives the loop it runs on.
*/
#include <ctype.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "http.h"
#include "lcore.h"

#define HTTP_MT "buzz.http"

struct lhttp {
  buzz_http *s;            /* owns; NULL once closed */
  lcore *c;                /* the core whose loop it runs on */
  struct lhttp *next;      /* the core's list (lcore.h: servers) */
};

static struct lhttp *check_http(lua_State *L) {
  struct lhttp *h = (struct lhttp *)luaL_checkudata(L, 1, HTTP_MT);
  if (h->s == NULL) luaL_error(L, "attempt to use a closed server");
  return h;
}

static void http_unlink(struct lhttp *h) {
  struct lhttp **p;
  for (p = &h->c->servers; *p != NULL; p = &(*p)->next)
    if (*p == h) {
      *p = h->next;
      break;
    }
}

/* core:serve(host, port, limits) */
static int lhttp_serve(lua_State *L) {
  lcore *c = buzz__lcore_check(L);
  const char *host = luaL_checkstring(L, 2);
  int port = (int)luaL_checkinteger(L, 3);
  buzz_http_opts o;
  struct lhttp *h;
  char err[ERR_MAX];
  int rc;
  luaL_checktype(L, 4, LUA_TTABLE);
  lua_getfield(L, 4, "max_header");
  o.max_header = (size_t)luaL_optinteger(L, -1, 16384);
  lua_getfield(L, 4, "max_body");
  o.max_body = (size_t)luaL_optinteger(L, -1, 1048576);
  lua_getfield(L, 4, "max_buffer");
  o.max_buffer = (size_t)luaL_optinteger(L, -1, 262144);
  lua_getfield(L, 4, "timeout_ms");
  o.timeout_ms = (int64_t)luaL_optinteger(L, -1, 10000);
  lua_getfield(L, 4, "max_conns");
  o.max_conns = (int)luaL_optinteger(L, -1, 4096);
  lua_pop(L, 5);
  h = (struct lhttp *)lua_newuserdata(L, sizeof *h);
  h->s = NULL;
  h->c = c;
  h->next = NULL;
  luaL_setmetatable(L, HTTP_MT);
  rc = buzz__http_listen(c->loop, host, port, &o, &h->s, err, sizeof err);
  if (rc != BUZZ_OK) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: bus:serve: %s", buzz__err_name(rc),
                    rc == BUZZ_ENOMEM ? buzz__err_message(rc) : err);
    lua_pushstring(L, buzz__err_name(rc));
    return 3;
  }
  h->next = c->servers;
  c->servers = h;
  lua_createtable(L, 1, 0);            /* the core lives as long as it */
  lua_pushvalue(L, 1);                 /* (LuaJIT: a table as fenv) */
  lua_rawseti(L, -2, 1);
  buzz_setuv(L, -2);
  return 1;
}

/* Pushes the headers of r as a table by lower-case name. */
static void push_headers(lua_State *L, const buzz_http_req *r) {
  const char *p = r->fields;
  int i;
  lua_createtable(L, 0, r->nfields);
  for (i = 0; i < r->nfields; i++) {
    size_t nlen = strlen(p), k;
    const char *v = p + nlen + 1;
    size_t vlen = strlen(v);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (k = 0; k < nlen; k++)
      luaL_addchar(&b, (char)tolower((unsigned char)p[k]));
    luaL_pushresult(&b);               /* the name */
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);
    if (lua_isstring(L, -1)) {         /* repeated: joined */
      lua_pushliteral(L, ", ");
      lua_pushlstring(L, v, vlen);
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushlstring(L, v, vlen);
    }
    lua_rawset(L, -3);
    p = v + vlen + 1;
  }
}

static int lhttp_next(lua_State *L) {
  struct lhttp *h = check_http(L);
  buzz_http_req *r = buzz__http_next(h->s);
  if (r == NULL) return 0;
  if (r->kind == BUZZ_HTTP_CLOSED) {
    lua_pushliteral(L, "closed");
    lua_pushinteger(L, (lua_Integer)r->conn);
    buzz__http_req_free(r);
    return 2;
  }
  lua_pushliteral(L, "request");
  lua_pushinteger(L, (lua_Integer)r->conn);
  lua_pushstring(L, r->method);
  lua_pushstring(L, r->url);
  push_headers(L, r);
  lua_pushlstring(L, r->body, r->nbody);
  lua_pushboolean(L, r->keep_alive);
  lua_pushstring(L, r->peer);
  buzz__http_req_free(r);
  return 8;
}

static int lhttp_write(lua_State *L) {
  struct lhttp *h = check_http(L);
  uint64_t conn = (uint64_t)luaL_checkinteger(L, 2);
  size_t len;
  const char *data = luaL_checklstring(L, 3, &len);
  const char *f = luaL_optstring(L, 4, "");
  int flags = 0, rc;
  for (; *f; f++) {
    if (*f == 'e') flags |= BUZZ_HTTP_END;
    else if (*f == 'c') flags |= BUZZ_HTTP_CLOSE;
    else if (*f == 'f') flags |= BUZZ_HTTP_FORCE;
    else return luaL_argerror(L, 4, "flags are \"e\", \"c\", \"f\"");
  }
  rc = buzz__http_write(h->s, conn, data, len, flags);
  if (rc == BUZZ_OK) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, buzz__err_name(rc));
  return 2;
}

static int lhttp_queued(lua_State *L) {
  struct lhttp *h = check_http(L);
  uint64_t conn = (uint64_t)luaL_checkinteger(L, 2);
  lua_pushinteger(L, (lua_Integer)buzz__http_queued(h->s, conn));
  return 1;
}

static int lhttp_count(lua_State *L) {
  lua_pushinteger(L, buzz__http_count(check_http(L)->s));
  return 1;
}

static int lhttp_port(lua_State *L) {
  lua_pushinteger(L, buzz__http_port(check_http(L)->s));
  return 1;
}

/* srv:close(): idempotent; also __gc. The handles close on the loop's
** next runs (the core's close runs them). */
static int lhttp_close(lua_State *L) {
  struct lhttp *h = (struct lhttp *)luaL_checkudata(L, 1, HTTP_MT);
  if (h->s != NULL) {
    buzz__http_close(h->s);
    h->s = NULL;
    http_unlink(h);
    if (h->c->loop != NULL) buzz__loop_poll(h->c->loop);
  }
  return 0;
}

int buzz__lhttp_has_queued(const lcore *c) {
  const struct lhttp *h;
  for (h = c->servers; h != NULL; h = h->next)
    if (h->s != NULL && buzz__http_has_queued(h->s)) return 1;
  return 0;
}

/* Closes the servers of c (lcore_close, before the loop closes). */
void buzz__lhttp_close_all(lcore *c) {
  struct lhttp *h = c->servers, *next;
  for (; h != NULL; h = next) {
    next = h->next;
    buzz__http_close(h->s);
    h->s = NULL;
    h->next = NULL;
  }
  c->servers = NULL;
}

/* ------------------------------------------------------------- crypto */

/* core.hmac_sha256(key, data) -> 64 lower-case hex digits */
static int lhmac_sha256(lua_State *L) {
  size_t klen, dlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *data = luaL_checklstring(L, 2, &dlen);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0, i;
  char hex[2 * EVP_MAX_MD_SIZE + 1];
  if (HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)data, dlen,
           md, &mdlen) == NULL)
    return luaL_error(L, "core.hmac_sha256: libcrypto failed");
  for (i = 0; i < mdlen; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
  lua_pushlstring(L, hex, 2 * mdlen);
  return 1;
}

/* core.sha256(data) -> 64 lower-case hex digits */
static int lsha256(lua_State *L) {
  size_t dlen;
  const char *data = luaL_checklstring(L, 1, &dlen);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0, i;
  char hex[2 * EVP_MAX_MD_SIZE + 1];
  if (EVP_Digest(data, dlen, md, &mdlen, EVP_sha256(), NULL) != 1)
    return luaL_error(L, "core.sha256: libcrypto failed");
  for (i = 0; i < mdlen; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
  lua_pushlstring(L, hex, 2 * mdlen);
  return 1;
}

/* core.equal_secret(a, b): compares in time that depends on the length
** only (CRYPTO_memcmp), for signatures and tokens. */
static int lequal_secret(lua_State *L) {
  size_t alen, blen;
  const char *a = luaL_checklstring(L, 1, &alen);
  const char *b = luaL_checklstring(L, 2, &blen);
  lua_pushboolean(L, alen == blen && CRYPTO_memcmp(a, b, alen) == 0);
  return 1;
}

static const luaL_Reg http_methods[] = {
  { "next", lhttp_next },
  { "write", lhttp_write },
  { "queued", lhttp_queued },
  { "count", lhttp_count },
  { "port", lhttp_port },
  { "close", lhttp_close },
  { NULL, NULL }
};

const luaL_Reg buzz__lhttp_methods[] = {
  { "serve", lhttp_serve },
  { NULL, NULL }
};

const luaL_Reg buzz__lhttp_funcs[] = {
  { "hmac_sha256", lhmac_sha256 },
  { "sha256", lsha256 },
  { "equal_secret", lequal_secret },
  { NULL, NULL }
};

void buzz__lhttp_register(lua_State *L) {
  if (luaL_newmetatable(L, HTTP_MT)) {
    lua_pushliteral(L, HTTP_MT);
    lua_setfield(L, -2, "__name");
    lua_newtable(L);
    luaL_setfuncs(L, http_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, lhttp_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
}
