package registry_test

import (
	"context"
	"log"

	"github.com/guilhem/operator-plugin-framework/go/registry"
)

// Watch turns registrations into whatever the operator needs, for example
// requeueing the objects that wait for a plugin.
func ExampleRegistry_Watch() {
	var reg *registry.Registry // srv.GetRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for ev := range reg.Watch(ctx) {
		switch ev.Type {
		case registry.Registered:
			log.Printf("plugin %s %s connected (instance %s)", ev.Instance.Name, ev.Instance.Version, ev.Instance.ID)
		case registry.Unregistered:
			log.Printf("instance %s of plugin %s left", ev.Instance.ID, ev.Instance.Name)
		}
	}
}
