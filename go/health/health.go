// Package health gives controller-runtime health and readiness checks for
// an operator that serves plugins:
//
//	if err := mgr.AddHealthzCheck("plugin-server", health.Listening(srv)); err != nil {
//		return err
//	}
//	if err := mgr.AddReadyzCheck("plugins", health.Plugins(srv.GetRegistry(), "validator")); err != nil {
//		return err
//	}
//
// Listening fits a liveness or readiness probe. Plugins fits readiness only
// when the operator cannot do its job without those plugins: a pod that is
// not ready receives no traffic from a Service, so gate readiness on a
// plugin only if nothing reaches the operator through the Service that
// the plugins connect to (that would keep them from ever connecting).
package health

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/healthz"

	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// Listening passes once srv listens for plugins, and fails before (Start
// has not bound its address yet, or failed to).
func Listening(srv *server.Server) healthz.Checker {
	return func(*http.Request) error {
		// Addr returns at once when the server listens; the short context
		// only bounds the wait when it does not.
		ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
		defer cancel()
		if _, err := srv.Addr(ctx); err != nil {
			return fmt.Errorf("the plugin server is not listening")
		}
		return nil
	}
}

// Plugins passes while every plugin named has at least one instance that
// accepts calls (connected, not draining), and names those that have none.
func Plugins(reg registry.Plugins, names ...string) healthz.Checker {
	return func(*http.Request) error {
		// Wait with a context that has already ended does not wait: it
		// returns a provider when an instance accepts calls now.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		var missing []string
		for _, name := range names {
			if _, err := reg.Wait(ctx, name); err != nil {
				missing = append(missing, fmt.Sprintf("%q", name))
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("no instance accepts calls for plugin %s", strings.Join(missing, ", "))
		}
		return nil
	}
}
