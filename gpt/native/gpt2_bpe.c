/* GPT-2's byte-pair encoding, exactly as tiktoken's `encode_ordinary` computes it, for the
 * tokenize stage (gpt/native_bpe.py builds this file and loads it with ctypes).
 *
 * Two steps, as in tiktoken:
 *   1. Split the text into pieces with GPT-2's pattern (tiktoken's r50k_pat_str)
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      written out as a scanner over code points; the classes \p{L}, \p{N} and \s come from
 *      unicode_classes.h, generated against tiktoken itself (tools/gpt2_unicode_classes.py).
 *   2. A piece that is a token is that token; any other piece is merged byte pair by byte
 *      pair, always the pair whose joined bytes have the lowest rank, the leftmost on a tie
 *      (tiktoken's byte_pair_merge).
 *
 * The vocabulary is handed in by the caller (tiktoken's checked GPT-2 ranks, token i = rank i)
 * and held in an open-addressing hash table whose slots carry the first 8 bytes of their
 * token, so a lookup touches one cache line. Nothing is written after gpt2_bpe_new returns:
 * any number of threads may encode with one table at once.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "unicode_classes.h"

enum { OTHER = 0, LETTER = 1, NUMBER = 2, SPACE = 3 };
#define NO_RANK 0xFFFFFFFFu
#define STACK_PARTS 64

typedef struct {
    uint64_t head;  /* the token's first 8 bytes, zero-padded */
    uint32_t token; /* its id (= its rank) */
    uint32_t size;  /* its length in bytes; 0: an empty slot */
} Slot;

typedef struct {
    uint8_t classes[0x110000];   /* OTHER, LETTER, NUMBER or SPACE for each code point */
    uint32_t byte_rank[256];     /* tokens of one byte */
    uint32_t pair_rank[65536];   /* tokens of two bytes, NO_RANK where none */
    Slot *slots;
    uint8_t *tags;               /* 8 bits of each slot's hash, never 0; 0: empty. Small enough to
                                    stay in cache, so a lookup of a non-token rarely touches slots */
    uint32_t mask;               /* slots - 1 (a power of two) */
    int shift;                   /* 64 - log2(slots): a hash's top bits pick its slot */
    uint8_t *bytes;              /* every token's bytes, token after token */
    uint64_t *starts;            /* token t is bytes[starts[t]:starts[t + 1]] */
} Gpt2Bpe;

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* A word that, with the size, determines the first 8 bytes of p[0:size] (all of them when
 * size <= 8), read without touching a byte past the end. */
static inline uint64_t head_of(const uint8_t *p, size_t size) {
    if (size >= 8) return load64(p);
    if (size >= 4) return load32(p) | (load32(p + size - 4) << 32); /* overlapping reads */
    return p[0] | ((uint64_t)p[size >> 1] << 8) | ((uint64_t)p[size - 1] << 16);
}

static inline uint64_t hash_bytes(const uint8_t *p, size_t size) {
    uint64_t h = head_of(p, size) ^ (size * 0x9E3779B97F4A7C15ull);
    if (size > 8) {
        for (size_t i = 8; i + 8 < size; i += 8) h = (h ^ load64(p + i)) * 0x100000001b3ull;
        h ^= load64(p + size - 8) * 0xc2b2ae3d27d4eb4full;
    }
    h ^= h >> 33; h *= 0xff51afd7ed558ccdull; /* murmur3's finaliser: every input bit reaches the top bits */
    h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

static inline uint8_t tag_of(uint64_t h) {
    return (uint8_t)(h & 0xFF) | 1; /* low bits: the slot comes from the top bits */
}

/* The rank of the token whose bytes are p[0:size], or NO_RANK. */
static inline uint32_t rank_of(const Gpt2Bpe *b, const uint8_t *p, size_t size) {
    if (size == 1) return b->byte_rank[p[0]];
    if (size == 2) return b->pair_rank[(p[0] << 8) | p[1]];
    uint64_t h = hash_bytes(p, size);
    uint8_t tag = tag_of(h);
    for (uint32_t i = (uint32_t)(h >> b->shift);; i = (i + 1) & b->mask) {
        if (b->tags[i] == 0) return NO_RANK;
        if (b->tags[i] != tag) continue;
        const Slot *slot = &b->slots[i];
        if (slot->head == head_of(p, size) && slot->size == size &&
            (size <= 8 || memcmp(b->bytes + b->starts[slot->token] + 8, p + 8, size - 8) == 0))
            return slot->token;
    }
}

void gpt2_bpe_free(Gpt2Bpe *b) {
    if (b) {
        free(b->slots);
        free(b->tags);
        free(b->bytes);
        free(b->starts);
        free(b);
    }
}

/* A table for `count` tokens: token t is bytes[starts[t]:starts[t + 1]]. NULL when out of memory. */
Gpt2Bpe *gpt2_bpe_new(const uint8_t *bytes, const uint64_t *starts, uint32_t count) {
    Gpt2Bpe *b = calloc(1, sizeof(Gpt2Bpe));
    if (!b) return NULL;
    for (int r = 0; r < CLASS_RANGE_COUNT; r++)
        memset(b->classes + CLASS_RANGES[r][0], (int)CLASS_RANGES[r][2], CLASS_RANGES[r][1] - CLASS_RANGES[r][0] + 1);
    memset(b->byte_rank, 0xff, sizeof b->byte_rank);
    memset(b->pair_rank, 0xff, sizeof b->pair_rank);
    uint32_t size = 1;
    int bits = 0;
    while (size < 2 * count) {
        size <<= 1;
        bits++;
    }
    b->mask = size - 1;
    b->shift = 64 - bits;
    b->slots = calloc(size, sizeof(Slot));
    b->tags = calloc(size, 1);
    b->bytes = malloc(starts[count] ? starts[count] : 1);
    b->starts = malloc((count + 1) * sizeof(uint64_t));
    if (!b->slots || !b->tags || !b->bytes || !b->starts) {
        gpt2_bpe_free(b);
        return NULL;
    }
    memcpy(b->bytes, bytes, starts[count]);
    memcpy(b->starts, starts, (count + 1) * sizeof(uint64_t));
    for (uint32_t t = 0; t < count; t++) {
        const uint8_t *p = bytes + starts[t];
        size_t n = starts[t + 1] - starts[t];
        if (n == 1) b->byte_rank[p[0]] = t;
        if (n == 2) b->pair_rank[(p[0] << 8) | p[1]] = t;
        uint64_t h = hash_bytes(p, n);
        uint32_t i = (uint32_t)(h >> b->shift);
        while (b->tags[i]) i = (i + 1) & b->mask;
        b->slots[i] = (Slot){head_of(p, n), t, (uint32_t)n};
        b->tags[i] = tag_of(h);
    }
    return b;
}

/* tiktoken's byte_pair_merge: parts start at start[0..count-1] (the last is the piece's end);
 * rank[i] is the rank of parts i and i + 1 joined. Returns how many tokens it wrote. */
static size_t byte_pair_encode(const Gpt2Bpe *b, const uint8_t *p, size_t size, uint32_t *out) {
    size_t start_on_stack[STACK_PARTS + 1];
    uint32_t rank_on_stack[STACK_PARTS + 1];
    int on_heap = size > STACK_PARTS;
    size_t *start = on_heap ? malloc((size + 1) * sizeof(size_t)) : start_on_stack;
    uint32_t *rank = on_heap ? malloc((size + 1) * sizeof(uint32_t)) : rank_on_stack;
    if (!start || !rank) abort();
    size_t count = size + 1;
    for (size_t i = 0; i <= size; i++) start[i] = i;
    for (size_t i = 0; i + 1 < size; i++) rank[i] = b->pair_rank[(p[i] << 8) | p[i + 1]];
    rank[size - 1] = rank[size] = NO_RANK;
    for (;;) {
        uint32_t best = NO_RANK;
        size_t at = 0;
        for (size_t i = 0; i + 2 < count; i++)
            if (rank[i] < best) {
                best = rank[i];
                at = i;
            }
        if (best == NO_RANK) break;
        /* join parts at and at + 1, then re-rank the pairs the new part belongs to */
        memmove(start + at + 1, start + at + 2, (count - at - 2) * sizeof(size_t));
        memmove(rank + at + 1, rank + at + 2, (count - at - 2) * sizeof(uint32_t));
        count--;
        rank[at] = at + 2 < count ? rank_of(b, p + start[at], start[at + 2] - start[at]) : NO_RANK;
        if (at > 0) rank[at - 1] = rank_of(b, p + start[at - 1], start[at + 1] - start[at - 1]);
    }
    size_t written = 0;
    for (size_t i = 0; i + 1 < count; i++) out[written++] = rank_of(b, p + start[i], start[i + 1] - start[i]);
    if (on_heap) {
        free(start);
        free(rank);
    }
    return written;
}

static inline size_t encode_piece(const Gpt2Bpe *b, const uint8_t *p, size_t size, uint32_t *out) {
    uint32_t token = rank_of(b, p, size);
    if (token != NO_RANK) {
        out[0] = token;
        return 1;
    }
    return byte_pair_encode(b, p, size, out);
}

/* The class of the code point at s[i] (valid UTF-8), and where the next one starts. */
static inline int class_at(const Gpt2Bpe *b, const uint8_t *s, size_t i, size_t *next) {
    uint8_t lead = s[i];
    if (lead < 0x80) {
        *next = i + 1;
        return b->classes[lead];
    }
    uint32_t code;
    if (lead < 0xE0) {
        code = ((lead & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu);
        *next = i + 2;
    } else if (lead < 0xF0) {
        code = ((lead & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu);
        *next = i + 3;
    } else {
        code = ((lead & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu);
        *next = i + 4;
    }
    return b->classes[code];
}

/* Whether s[0:n] is valid UTF-8 as Python's strict decoder judges it (no overlong forms,
 * surrogates or code points above U+10FFFF). */
static int valid_utf8(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n && (load64(s + i) & 0x8080808080808080ull) == 0) { /* eight ASCII bytes */
            i += 8;
            continue;
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t more;
        uint8_t low = 0x80, high = 0xBF; /* allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) more = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            more = 2;
            if (c == 0xE0) low = 0xA0;
            if (c == 0xED) high = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            more = 3;
            if (c == 0xF0) low = 0x90;
            if (c == 0xF4) high = 0x8F;
        } else return 0;
        if (i + more >= n) return 0; /* cut short */
        if (s[i + 1] < low || s[i + 1] > high) return 0;
        for (size_t k = 2; k <= more; k++)
            if ((s[i + k] & 0xC0) != 0x80) return 0;
        i += more + 1;
    }
    return 1;
}

/* GPT-2's tokens for the valid UTF-8 text s[0:n] into out (room for n tokens: a token is at
 * least a byte). Returns how many. */
size_t gpt2_bpe_encode(const Gpt2Bpe *b, const uint8_t *s, size_t n, uint32_t *out) {
    size_t i = 0, written = 0;
    while (i < n) {
        size_t next, end;
        /* 's|'t|'re|'ve|'m|'ll|'d */
        if (s[i] == '\'' && i + 1 < n) {
            uint8_t c1 = s[i + 1], c2 = i + 2 < n ? s[i + 2] : 0;
            size_t contraction = (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') ? 2
                               : ((c1 == 'l' && c2 == 'l') || (c1 == 'v' && c2 == 'e') || (c1 == 'r' && c2 == 'e')) ? 3 : 0;
            if (contraction) {
                written += encode_piece(b, s + i, contraction, out + written);
                i += contraction;
                continue;
            }
        }
        /* ' ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+': a space joins a run of letters, digits or others after it */
        int kind = class_at(b, s, i, &next);
        end = next;
        if (s[i] == ' ' && next < n) {
            size_t after;
            int following = class_at(b, s, next, &after);
            if (following != SPACE) {
                kind = following;
                end = after;
            }
        }
        if (kind != SPACE) {
            size_t after;
            while (end < n && class_at(b, s, end, &after) == kind) end = after;
            written += encode_piece(b, s + i, end - i, out + written);
            i = end;
            continue;
        }
        /* '\s+(?!\S)|\s+': a run of spaces, less its last one when a non-space follows (that one
         * joins the next piece); a lone space before a non-space is a piece of its own */
        size_t last = i, after;
        while (end < n && class_at(b, s, end, &after) == SPACE) {
            last = end;
            end = after;
        }
        if (end < n && last > i) end = last;
        written += encode_piece(b, s + i, end - i, out + written);
        i = end;
    }
    return written;
}

/* Encode data[starts[k]:ends[k]] for each of `count` texts, one after another into out (room
 * for as many tokens as the texts have bytes); lengths[k]: text k's tokens. A text that is not
 * valid UTF-8 is left out (its length 0) and flagged in invalid[k], for the caller to repair.
 * Returns the tokens written. */
size_t gpt2_bpe_encode_batch(const Gpt2Bpe *b, const uint8_t *data, const int64_t *starts, const int64_t *ends,
                             size_t count, uint32_t *out, uint32_t *lengths, uint8_t *invalid) {
    size_t written = 0;
    for (size_t k = 0; k < count; k++) {
        const uint8_t *text = data + starts[k];
        size_t n = (size_t)(ends[k] - starts[k]);
        invalid[k] = !valid_utf8(text, n);
        lengths[k] = invalid[k] ? 0 : (uint32_t)gpt2_bpe_encode(b, text, n, out + written);
        written += lengths[k];
    }
    return written;
}
