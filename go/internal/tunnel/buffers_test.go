package tunnel

import "testing"

func TestTieredPool(t *testing.T) {
	p := newTieredPool(10, 12)
	for _, tc := range []struct{ n, cap int }{
		{0, 1 << 10}, {1, 1 << 10}, {1<<10 - 1, 1 << 10}, {1 << 10, 1 << 10},
		{1<<10 + 1, 2 << 10}, {4 << 10, 4 << 10}, {4<<10 + 1, 4<<10 + 1},
	} {
		b := p.Get(tc.n)
		if len(*b) != tc.n || cap(*b) != tc.cap {
			t.Errorf("Get(%d): len %d cap %d, want len %d cap %d", tc.n, len(*b), cap(*b), tc.n, tc.cap)
		}
		p.Put(b)
	}
	// A freed buffer comes back, uncleared, for another size of its tier.
	for range 100 { // sync.Pool may drop a buffer (often under -race)
		b := p.Get(3 << 10)
		(*b)[0] = 7
		p.Put(b)
		c := p.Get(2<<10 + 1)
		if cap(*c) != 4<<10 {
			t.Fatalf("cap %d, want %d", cap(*c), 4<<10)
		}
		if (*c)[0] == 7 {
			return
		}
	}
	t.Error("a freed buffer was never handed out again")
}
