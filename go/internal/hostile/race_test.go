//go:build race

package hostile

// raceFactor scales the memory bounds: the race detector's shadow memory
// multiplies what the server's allocations cost in RSS.
const raceFactor = 4
