package auth

import (
	"sync"
	"time"
)

// cache is a bounded map whose entries expire. It keeps at most size
// entries: when full, expired entries go first, then the entry closest to
// expiring. It is safe for concurrent use.
type cache[K comparable, V any] struct {
	size int
	now  func() time.Time

	mu      sync.Mutex
	entries map[K]cacheEntry[V]
}

type cacheEntry[V any] struct {
	value   V
	expires time.Time
}

func newCache[K comparable, V any](size int, now func() time.Time) *cache[K, V] {
	return &cache[K, V]{size: size, now: now, entries: make(map[K]cacheEntry[V])}
}

// get returns the value stored under k if it has not expired.
func (c *cache[K, V]) get(k K) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[k]
	if !ok {
		var zero V
		return zero, false
	}
	if !c.now().Before(e.expires) {
		delete(c.entries, k)
		var zero V
		return zero, false
	}
	return e.value, true
}

// put stores v under k until expires; it does nothing when expires has
// passed or the cache has no room at all (size ≤ 0).
func (c *cache[K, V]) put(k K, v V, expires time.Time) {
	if c.size <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if !now.Before(expires) {
		return
	}
	if _, ok := c.entries[k]; !ok && len(c.entries) >= c.size {
		c.evictLocked(now)
	}
	c.entries[k] = cacheEntry[V]{value: v, expires: expires}
}

// evictLocked makes room for one entry. Caller holds c.mu.
func (c *cache[K, V]) evictLocked(now time.Time) {
	var (
		soonest    K
		soonestExp time.Time
		found      bool
	)
	for k, e := range c.entries {
		if !now.Before(e.expires) {
			delete(c.entries, k)
			continue
		}
		if !found || e.expires.Before(soonestExp) {
			soonest, soonestExp, found = k, e.expires, true
		}
	}
	if len(c.entries) >= c.size && found {
		delete(c.entries, soonest)
	}
}

// len is the number of entries, expired or not.
func (c *cache[K, V]) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
