// Package callerr holds the error values that the tunnel engine and the
// registry share. It imports nothing, so that the engine, and through it a
// plugin binary, does not link the registry (and with it controller-runtime
// and Prometheus).
package callerr

import "errors"

// ErrRefused is what an error wraps when a tunnel turned a call away before
// sending any of it: the call cannot have run, so the registry may send it
// to another instance. registry.ErrRefused is this value.
var ErrRefused = errors.New("plugin instance no longer accepts calls")
