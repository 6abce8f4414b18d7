/*
** fuzz/subject.c: libFuzzer harness for the subject grammar and the
** matcher (csrc/match.c), differential against a reference written here.
**
** Input: lines separated by '\n'. The last line is a published type; the
** lines before it (at most MAX_PATTERNS) are patterns. Each string goes
** through the real checker (buzz__subject_check) and through ref_check, a
** direct transcription of DESIGN.md "Subjects"; they must agree on what
** is valid. The valid patterns are indexed in a real trie, and for a valid
** type the trie's audience (buzz__trie_match, twice: built and cached),
** and buzz__subject_match for each pattern, must be exactly the patterns
** ref_match accepts. Then every other subscription is removed and the
** audience (rebuilt for the new generation) must follow. Any disagreement
** aborts, which libFuzzer reports as a crash with the input.
**
** The reference is written for obviousness, not speed: it splits both
** strings into token arrays first and compares them token by token.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../csrc/buzz.h"

#define MAX_PATTERNS 16
#define MAX_TOKENS   (BUZZ_SUBJECT_MAX + 1)

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

typedef struct tok {
  const char *p;
  size_t n;
} tok;

static void fail(const char *what, const char *pat, size_t plen,
                 const char *type, size_t tlen) {
  fprintf(stderr, "subject fuzz: %s\n  pattern: \"%.*s\"\n  type: \"%.*s\"\n",
          what, (int)plen, pat ? pat : "", (int)tlen, type ? type : "");
  abort();
}

/* Splits s on every '.', empty tokens included; returns the count. */
static size_t split(const char *s, size_t len, tok *out) {
  size_t n = 0, start = 0, i;
  for (i = 0; i <= len; i++) {
    if (i == len || s[i] == '.') {
      out[n].p = s + start;
      out[n].n = i - start;
      n++;
      start = i + 1;
    }
  }
  return n;
}

static int is_tok(const tok *t, char c) {
  return t->n == 1 && t->p[0] == c;
}

/* DESIGN.md "Subjects": is s a valid pattern (is_pattern) or type? */
static int ref_check(const char *s, size_t len, int is_pattern) {
  static tok t[MAX_TOKENS];
  size_t n, i;
  if (len == 0 || len > BUZZ_SUBJECT_MAX) return 0;
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c <= ' ' || c == 0x7f) return 0;        /* white space, controls */
  }
  n = split(s, len, t);
  for (i = 0; i < n; i++) {
    if (t[i].n == 0) return 0;                  /* empty token */
    if (is_tok(&t[i], '*') || is_tok(&t[i], '>')) {
      if (!is_pattern) return 0;                /* types have no wildcards */
      if (is_tok(&t[i], '>') && i != n - 1) return 0;  /* '>' only last */
    }
  }
  return 1;
}

/* Does the valid pattern match the valid type? */
static int ref_match(const char *pat, size_t plen, const char *type,
                     size_t tlen) {
  static tok p[MAX_TOKENS], t[MAX_TOKENS];
  size_t np = split(pat, plen, p), nt = split(type, tlen, t), i;
  int has_gt = is_tok(&p[np - 1], '>');
  /* a wildcard first token never matches a reserved ('$') type */
  if (type[0] == '$' && (is_tok(&p[0], '*') || is_tok(&p[0], '>')))
    return 0;
  if (has_gt ? nt < np : nt != np) return 0;
  for (i = 0; i < (has_gt ? np - 1 : np); i++) {
    if (is_tok(&p[i], '*')) continue;
    if (p[i].n != t[i].n || memcmp(p[i].p, t[i].p, p[i].n) != 0) return 0;
  }
  return 1;
}

/* Checks the trie's audience of subj against want (indexed by seq). */
static void check_vec(buzz_trie *trie, buzz_subject *subj,
                      const int *want, size_t nsubs, buzz_sub **subs) {
  buzz_matchvec *v;
  size_t i, k = 0;
  if (buzz__trie_match(trie, subj, &v) != BUZZ_OK) abort();   /* ENOMEM */
  for (i = 0; i < nsubs; i++) {
    if (!want[i]) continue;
    if (k >= v->n || v->subs[k] != subs[i])
      fail(k >= v->n ? "trie misses a matching pattern"
                     : "trie audience differs or is out of order",
           subs[i]->pattern, subs[i]->len, subj->type, subj->len);
    k++;
  }
  if (k != v->n)
    fail("trie matches a pattern the reference does not", v->subs[k]->pattern,
         v->subs[k]->len, subj->type, subj->len);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
  const char *lines[MAX_PATTERNS + 1];
  size_t lens[MAX_PATTERNS + 1], nlines = 0, start = 0, i, nsubs = 0;
  const char *s = (const char *)data;
  buzz_sub *subs[MAX_PATTERNS];
  int want[MAX_PATTERNS];
  const char *type;
  size_t tlen;
  buzz_trie *trie;
  for (i = 0; i <= size && nlines <= MAX_PATTERNS; i++) {
    if (i == size || s[i] == '\n') {
      lines[nlines] = s + start;
      lens[nlines] = i - start;
      nlines++;
      start = i + 1;
    }
  }
  type = lines[nlines - 1];
  tlen = lens[nlines - 1];

  /* the grammar: the checker and the reference agree, for both roles */
  for (i = 0; i < nlines; i++) {
    int is_pattern;
    for (is_pattern = 0; is_pattern <= 1; is_pattern++) {
      const char *why = buzz__subject_check(lines[i], lens[i], is_pattern);
      if ((why == NULL) != ref_check(lines[i], lens[i], is_pattern))
        fail(why ? "checker refuses what the grammar allows"
                 : "checker allows what the grammar refuses",
             is_pattern ? lines[i] : NULL, is_pattern ? lens[i] : 0,
             is_pattern ? NULL : lines[i], is_pattern ? 0 : lens[i]);
    }
  }

  if ((trie = buzz__trie_new()) == NULL) return 0;
  for (i = 0; i + 1 < nlines; i++) {
    buzz_sub *sub;
    if (buzz__subject_check(lines[i], lens[i], 1) != NULL) continue;
    if ((sub = calloc(1, sizeof *sub)) == NULL) abort();
    if ((sub->pattern = malloc(lens[i] + 1)) == NULL) abort();
    memcpy(sub->pattern, lines[i], lens[i]);
    sub->pattern[lens[i]] = '\0';
    sub->len = lens[i];
    sub->seq = nsubs + 1;
    sub->refcount = 1;                   /* ours; released at the end */
    sub->data_ref = sub->fn_ref = sub->filter_ref = BUZZ_NOREF;
    if (buzz__trie_insert(trie, sub) != BUZZ_OK) abort();
    subs[nsubs++] = sub;
  }

  if (buzz__subject_check(type, tlen, 0) == NULL) {
    buzz_subject *subj = buzz__trie_subject(trie, type, tlen);
    if (subj == NULL) abort();
    for (i = 0; i < nsubs; i++) {
      want[i] = ref_match(subs[i]->pattern, subs[i]->len, type, tlen);
      if (buzz__subject_match(subs[i]->pattern, subs[i]->len, type, tlen)
          != want[i])
        fail(want[i] ? "buzz__subject_match misses a match"
                     : "buzz__subject_match matches what it should not",
             subs[i]->pattern, subs[i]->len, type, tlen);
    }
    check_vec(trie, subj, want, nsubs, subs);
    check_vec(trie, subj, want, nsubs, subs);          /* the cached one */
    for (i = 0; i < nsubs; i += 2) {
      buzz__trie_remove(trie, subs[i]);
      want[i] = 0;
    }
    check_vec(trie, subj, want, nsubs, subs);          /* rebuilt */
    buzz__subject_release(subj);
  }

  buzz__trie_free(trie);            /* releases the cached vectors */
  for (i = 0; i < nsubs; i++) {
    if (subs[i]->refcount != 1) fail("a match vector kept a reference",
                                     subs[i]->pattern, subs[i]->len, NULL, 0);
    buzz__sub_release(subs[i]);      /* frees it (bus.c) */
  }
  return 0;
}
