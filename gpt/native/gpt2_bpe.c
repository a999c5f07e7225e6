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
 * The vocabulary is read here from the caller's checked GPT-2 encoder.json (token i = rank i)
 * into an open-addressing hash table whose slots carry the first 8 bytes of their token and
 * where the rest is, so a lookup of a token of up to 8 bytes touches one cache line. Nothing
 * is written to it after gpt2_bpe_new_from_encoder_json returns: any number of threads may
 * encode with one table at once, each with a cache of its own for the pieces it merged
 * (gpt2_cache_new).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "unicode_classes.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ascii_letters_end reads eight bytes as one little-endian word"
#endif

enum { OTHER = 0, LETTER = 1, NUMBER = 2, SPACE = 3 };
#define NO_RANK 0xFFFFFFFFu
#define STACK_PARTS 64

typedef struct {
    uint64_t head;  /* the token's first 8 bytes, zero-padded */
    uint32_t token; /* its id (= its rank) */
    uint32_t where; /* its length in bytes (low 8 bits) and where its bytes start in `bytes` (the rest) */
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
    uint32_t count;              /* tokens */
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

/* Whether a[0:size] and b[0:size] are equal, without a call for the short ones. */
static inline int same_bytes(const uint8_t *a, const uint8_t *b, size_t size) {
    if (size <= 8) return head_of(a, size) == head_of(b, size);
    if (size <= 16) return load64(a) == load64(b) && load64(a + size - 8) == load64(b + size - 8);
    return memcmp(a, b, size) == 0;
}

static inline uint8_t tag_of(uint64_t h) {
    return (uint8_t)(h & 0xFF) | 1; /* low bits: the slot comes from the top bits */
}

/* The rank of the token whose bytes are p[0:size] (3 or more), whose hash is h, or NO_RANK. */
static inline uint32_t rank_hashed(const Gpt2Bpe *b, const uint8_t *p, size_t size, uint64_t h) {
    uint8_t tag = tag_of(h);
    for (uint32_t i = (uint32_t)(h >> b->shift);; i = (i + 1) & b->mask) {
        if (b->tags[i] == 0) return NO_RANK;
        if (b->tags[i] != tag) continue;
        const Slot *slot = &b->slots[i];
        if (slot->head == head_of(p, size) && (slot->where & 0xFF) == size &&
            (size <= 8 || same_bytes(b->bytes + (slot->where >> 8), p, size)))
            return slot->token;
    }
}

/* The rank of the token whose bytes are p[0:size], or NO_RANK. */
static inline uint32_t rank_of(const Gpt2Bpe *b, const uint8_t *p, size_t size) {
    if (size == 1) return b->byte_rank[p[0]];
    if (size == 2) return b->pair_rank[(p[0] << 8) | p[1]];
    return rank_hashed(b, p, size, hash_bytes(p, size));
}

/* A thread's memory of the pieces it merged lately: a piece that is not a token is merged
 * byte pair by byte pair, and the same words come back (in text of other languages most
 * words are such pieces). Direct-mapped by the piece's hash; pieces of up to CACHE_KEY_BYTES
 * bytes and CACHE_TOKENS tokens. */
#define CACHE_ENTRIES 8192
#define CACHE_KEY_BYTES 22
#define CACHE_TOKENS 6
typedef struct {
    uint8_t key[CACHE_KEY_BYTES];
    uint8_t size; /* 0: empty */
    uint8_t count;
    uint32_t tokens[CACHE_TOKENS];
} CacheEntry; /* 48 bytes */

typedef struct {
    CacheEntry entries[CACHE_ENTRIES];
} Gpt2Cache;

Gpt2Cache *gpt2_cache_new(void) { return calloc(1, sizeof(Gpt2Cache)); }

void gpt2_cache_free(Gpt2Cache *cache) { free(cache); }

void gpt2_bpe_free(Gpt2Bpe *b) {
    if (b) {
        free(b->slots);
        free(b->tags);
        free(b->bytes);
        free(b->starts);
        free(b);
    }
}

/* A table for `count` tokens: token t is bytes[starts[t]:starts[t + 1]]. NULL when out of memory,
 * or when the table's assumptions fail: a token of 0 or over 255 bytes, 16 MB of tokens or more,
 * ASCII letters other than a-z and A-Z. */
static Gpt2Bpe *gpt2_bpe_new(const uint8_t *bytes, const uint64_t *starts, uint32_t count) {
    if (count == 0 || starts[count] >= (1u << 24)) return NULL; /* a slot keeps 24 bits of where */
    for (uint32_t t = 0; t < count; t++)
        if (starts[t + 1] - starts[t] == 0 || starts[t + 1] - starts[t] > 0xFF) return NULL; /* and 8 of the size */
    Gpt2Bpe *b = calloc(1, sizeof(Gpt2Bpe));
    if (!b) return NULL;
    for (int r = 0; r < CLASS_RANGE_COUNT; r++)
        memset(b->classes + CLASS_RANGES[r][0], (int)CLASS_RANGES[r][2], CLASS_RANGES[r][1] - CLASS_RANGES[r][0] + 1);
    for (int c = 0; c < 0x80; c++) /* ascii_letters_end's assumption: the ASCII letters are a-z and A-Z */
        if ((b->classes[c] == LETTER) != ((c | 0x20) >= 'a' && (c | 0x20) <= 'z')) {
            free(b);
            return NULL;
        }
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
    b->count = count;
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
        b->slots[i] = (Slot){head_of(p, n), t, (uint32_t)(starts[t] << 8 | n)};
        b->tags[i] = tag_of(h);
    }
    return b;
}

/* GPT-2's byte-level alphabet, reversed: the byte each character of encoder.json stands for
 * (printable bytes stand for themselves, the others for U+0100 onwards, in order). */
#define ALPHABET_SIZE 324
static void byte_level_alphabet(int byte_of[ALPHABET_SIZE]) {
    int stand_in = 256;
    for (int c = 0; c < ALPHABET_SIZE; c++) byte_of[c] = -1;
    for (int byte = 0; byte < 256; byte++) {
        int printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || (byte >= 0xAE);
        byte_of[printable ? byte : stand_in++] = byte;
    }
}

static size_t skip_space(const char *json, size_t n, size_t i) {
    while (i < n && (json[i] == ' ' || json[i] == '\n' || json[i] == '\r' || json[i] == '\t')) i++;
    return i;
}

/* The JSON string at json[i] (its opening quote) as bytes of the byte-level alphabet into out;
 * returns the index after its closing quote, or 0 when it is not such a string. */
static size_t read_token(const char *json, size_t n, size_t i, const int byte_of[ALPHABET_SIZE], uint8_t *out, size_t *size) {
    if (i >= n || json[i] != '"') return 0;
    *size = 0;
    for (i++; i < n && json[i] != '"';) {
        uint32_t code;
        uint8_t c = (uint8_t)json[i];
        if (c == '\\') {
            if (i + 1 >= n) return 0;
            char e = json[i + 1];
            i += 2;
            if (e == 'u') {
                if (i + 4 > n) return 0;
                code = 0;
                for (int k = 0; k < 4; k++, i++) {
                    char h = json[i];
                    int digit = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
                    if (digit < 0) return 0;
                    code = code * 16 + (uint32_t)digit;
                }
            } else {
                const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
                const char *at = strchr(from, e);
                if (!e || !at) return 0;
                code = (uint8_t)to[at - from];
            }
        } else if (c < 0x80) {
            code = c;
            i++;
        } else if ((c & 0xE0) == 0xC0 && i + 1 < n) { /* the alphabet is below U+0800: two bytes at most */
            code = ((c & 0x1Fu) << 6) | ((uint8_t)json[i + 1] & 0x3Fu);
            i += 2;
        } else return 0;
        if (code >= ALPHABET_SIZE || byte_of[code] < 0) return 0;
        out[(*size)++] = (uint8_t)byte_of[code];
    }
    return i < n ? i + 1 : 0;
}

/* A table from GPT-2's encoder.json (json[0:n], {"token": rank, ...}): ranks 0..count-1 must
 * each appear once; larger ones ("<|endoftext|>") are left out. NULL when it is not such a
 * file, memory runs out or gpt2_bpe_new refuses the tokens. */
Gpt2Bpe *gpt2_bpe_new_from_encoder_json(const char *json, size_t n, uint32_t count) {
    int byte_of[ALPHABET_SIZE];
    byte_level_alphabet(byte_of);
    uint8_t *bytes = malloc(n), *read = malloc(n); /* a token has fewer bytes than its JSON */
    uint64_t *where = calloc(count, sizeof(uint64_t)), *starts = malloc((count + 1) * sizeof(uint64_t));
    uint32_t *sizes = calloc(count, sizeof(uint32_t));
    Gpt2Bpe *b = NULL;
    size_t i = skip_space(json, n, 0), used = 0, seen = 0;
    if (!bytes || !read || !where || !starts || !sizes || i >= n || json[i] != '{') goto done;
    i = skip_space(json, n, i + 1);
    while (i < n && json[i] != '}') {
        size_t size;
        i = read_token(json, n, i, byte_of, read, &size);
        if (!i || size == 0) goto done;
        i = skip_space(json, n, i);
        if (i >= n || json[i] != ':') goto done;
        i = skip_space(json, n, i + 1);
        uint64_t rank = 0;
        size_t digits = 0;
        for (; i < n && json[i] >= '0' && json[i] <= '9' && digits < 12; i++, digits++) rank = rank * 10 + (uint64_t)(json[i] - '0');
        if (!digits) goto done;
        if (rank < count) {
            if (sizes[rank]) goto done; /* a rank twice */
            memcpy(bytes + used, read, size);
            where[rank] = used;
            sizes[rank] = (uint32_t)size;
            used += size;
            seen++;
        }
        i = skip_space(json, n, i);
        if (i < n && json[i] == ',') i = skip_space(json, n, i + 1);
    }
    if (i >= n || seen != count) goto done;
    starts[0] = 0; /* the tokens in rank order */
    for (uint32_t t = 0; t < count; t++) {
        memcpy(read + starts[t], bytes + where[t], sizes[t]);
        starts[t + 1] = starts[t] + sizes[t];
    }
    b = gpt2_bpe_new(read, starts, count);
done:
    free(bytes);
    free(read);
    free(where);
    free(starts);
    free(sizes);
    return b;
}

/* The tiktoken version unicode_classes.h was generated against: its Unicode classes are that
 * version's (gpt/native_bpe.py refuses the engine beside another tiktoken). */
const char *gpt2_bpe_classes_tiktoken_version(void) { return CLASSES_TIKTOKEN_VERSION; }

/* Token `rank`'s bytes (for tests): their length, and where they are in *bytes. */
size_t gpt2_bpe_token(const Gpt2Bpe *b, uint32_t rank, const uint8_t **bytes) {
    if (rank >= b->count) return 0;
    *bytes = b->bytes + b->starts[rank];
    return b->starts[rank + 1] - b->starts[rank];
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

/* Where the run of ASCII letters at s[i:] ends, judged eight bytes at a time while eight remain
 * (the caller goes on one code point at a time: a non-ASCII letter may follow). */
static inline size_t ascii_letters_end(const uint8_t *s, size_t n, size_t i) {
    const uint64_t high = 0x8080808080808080ull;
    while (i + 8 <= n) {
        uint64_t word = load64(s + i);
        uint64_t low = (word | 0x2020202020202020ull) & 0x7F7F7F7F7F7F7F7Full; /* A-Z as a-z; no carry below */
        uint64_t letters = (low + 0x1F1F1F1F1F1F1F1Full) & ~(low + 0x0505050505050505ull) & ~word & high; /* 'a' <= byte <= 'z' */
        if (letters != high) return i + ((size_t)__builtin_ctzll(~letters & high) >> 3);
        i += 8;
    }
    return i;
}

/* Where the piece of GPT-2's pattern that starts at s[i] ends:
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+        */
static inline size_t piece_end(const Gpt2Bpe *b, const uint8_t *s, size_t n, size_t i) {
    size_t next, end, after;
    /* 's|'t|'re|'ve|'m|'ll|'d */
    if (s[i] == '\'' && i + 1 < n) {
        uint8_t c1 = s[i + 1], c2 = i + 2 < n ? s[i + 2] : 0;
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
        if ((c1 == 'l' && c2 == 'l') || (c1 == 'v' && c2 == 'e') || (c1 == 'r' && c2 == 'e')) return i + 3;
    }
    /* ' ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+': a space joins a run of letters, digits or others after it */
    int kind = class_at(b, s, i, &next);
    end = next;
    if (s[i] == ' ' && next < n) {
        int following = class_at(b, s, next, &after);
        if (following != SPACE) {
            kind = following;
            end = after;
        }
    }
    if (kind != SPACE) {
        if (kind == LETTER) end = ascii_letters_end(s, n, end);
        while (end < n && class_at(b, s, end, &after) == kind) end = after;
        return end;
    }
    /* '\s+(?!\S)|\s+': a run of spaces, less its last one when a non-space follows (that one
     * joins the next piece); a lone space before a non-space is a piece of its own */
    size_t last = i;
    while (end < n && class_at(b, s, end, &after) == SPACE) {
        last = end;
        end = after;
    }
    return end < n && last > i ? last : end;
}

#define PIECES_AHEAD 16

/* GPT-2's tokens for the valid UTF-8 text s[0:n] into out (room for n tokens: a token is at
 * least a byte), with the calling thread's cache (or NULL). Returns how many. Pieces are found
 * PIECES_AHEAD at a time and their table slots fetched from memory together, rather than
 * waited for one by one. */
size_t gpt2_bpe_encode(const Gpt2Bpe *b, Gpt2Cache *cache, const uint8_t *s, size_t n, uint32_t *out) {
    size_t starts[PIECES_AHEAD + 1], i = 0, written = 0;
    uint64_t hashes[PIECES_AHEAD];
    while (i < n) {
        size_t count = 0;
        starts[0] = i;
        while (i < n && count < PIECES_AHEAD) {
            i = piece_end(b, s, n, i);
            size_t size = i - starts[count];
            if (size >= 3) {
                hashes[count] = hash_bytes(s + starts[count], size);
                size_t slot = (size_t)(hashes[count] >> b->shift);
                __builtin_prefetch(&b->tags[slot]);
                __builtin_prefetch(&b->slots[slot]);
            }
            starts[++count] = i;
        }
        for (size_t k = 0; k < count; k++) {
            const uint8_t *piece = s + starts[k];
            size_t size = starts[k + 1] - starts[k];
            uint32_t token = size >= 3 ? rank_hashed(b, piece, size, hashes[k]) : rank_of(b, piece, size);
            if (token != NO_RANK) {
                out[written++] = token;
                continue;
            }
            CacheEntry *entry = cache && size >= 3 && size <= CACHE_KEY_BYTES ? &cache->entries[(hashes[k] >> 8) % CACHE_ENTRIES] : NULL;
            if (entry && entry->size == size && same_bytes(entry->key, piece, size)) {
                memcpy(out + written, entry->tokens, entry->count * sizeof(uint32_t));
                written += entry->count;
                continue;
            }
            size_t count = byte_pair_encode(b, piece, size, out + written);
            if (entry && count <= CACHE_TOKENS) {
                memcpy(entry->key, piece, size);
                entry->size = (uint8_t)size;
                entry->count = (uint8_t)count;
                memcpy(entry->tokens, out + written, count * sizeof(uint32_t));
            }
            written += count;
        }
    }
    return written;
}

/* Encode data[starts[k]:ends[k]] for each of `count` texts, with the calling thread's cache
 * (gpt2_cache_new; NULL: none), one after another into out, which has room for `room` tokens.
 * A text is encoded only while the room left is at least its bytes (a token is at least a
 * byte); *done says how many were, and the caller passes the rest again with a new `out`.
 * lengths[k]: text k's tokens. A text that is not valid UTF-8 is left out (its length 0) and
 * flagged in invalid[k], for the caller to repair. Returns the tokens written. */
size_t gpt2_bpe_encode_batch(const Gpt2Bpe *b, Gpt2Cache *cache, const uint8_t *data, const int64_t *starts, const int64_t *ends,
                             size_t count, uint32_t *out, size_t room, uint32_t *lengths, uint8_t *invalid, size_t *done) {
    size_t written = 0, k = 0;
    for (; k < count; k++) {
        const uint8_t *text = data + starts[k];
        size_t n = (size_t)(ends[k] - starts[k]);
        if (n > room - written) break;
        invalid[k] = !valid_utf8(text, n);
        lengths[k] = invalid[k] ? 0 : (uint32_t)gpt2_bpe_encode(b, cache, text, n, out + written);
        written += lengths[k];
    }
    *done = k;
    return written;
}
