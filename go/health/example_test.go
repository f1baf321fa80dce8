package health_test

import (
	"log"

	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/guilhem/operator-plugin-framework/go/health"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// An operator's manager reports the plugin server in /healthz and the
// plugins it needs in /readyz.
func Example() {
	var mgr ctrl.Manager // ctrl.NewManager(cfg, ctrl.Options{HealthProbeBindAddress: ":8081"})
	srv, err := server.New("unix:///var/run/plugins/operator.sock")
	if err != nil {
		log.Fatal(err)
	}
	if mgr == nil {
		return // a manager needs a cluster; the calls are what matters
	}
	if err := mgr.Add(srv); err != nil {
		log.Fatal(err)
	}
	if err := mgr.AddHealthzCheck("plugin-server", health.Listening(srv)); err != nil {
		log.Fatal(err)
	}
	if err := mgr.AddReadyzCheck("plugins", health.Plugins(srv.GetRegistry(), "validator")); err != nil {
		log.Fatal(err)
	}
}
