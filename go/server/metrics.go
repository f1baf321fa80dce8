package server

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Metrics of the limits a peer can reach, served with controller-runtime's
// own on the manager's metrics endpoint (docs/security.md, Limits).
var (
	connectionsGauge = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "plugin_framework", Subsystem: "server",
		Name: "connections",
		Help: "Connections the plugin server holds open.",
	})
	connectionsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "plugin_framework", Subsystem: "server",
		Name: "connections_refused_total",
		Help: "Connections closed as soon as accepted, by reason: limit and peer_limit (WithMaxConnections), peer (not the local proxy, WithLocalProxy).",
	}, []string{"reason"})
	unregisteredGauge = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "plugin_framework", Subsystem: "server",
		Name: "unregistered_tunnels",
		Help: "Tunnels being authenticated or waiting for their registration.",
	})
	tunnelsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "plugin_framework", Subsystem: "server",
		Name: "tunnels_refused_total",
		Help: "Tunnels refused before registration, by reason: unregistered_limit, peer_limit, unauthenticated, registration, handshake.",
	}, []string{"reason"})
	tunnelsDrained = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "plugin_framework", Subsystem: "server",
		Name: "tunnels_drained_total",
		Help: "Registered tunnels the server drained, by reason: max_age, expiry, revoked, shutdown.",
	}, []string{"reason"})
	logsSuppressed = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "plugin_framework", Subsystem: "server",
		Name: "log_lines_suppressed_total",
		Help: "Log lines about peers dropped by the log rate limit.",
	})
)

func init() {
	metrics.Registry.MustRegister(connectionsGauge, connectionsRefused, unregisteredGauge, tunnelsRefused, tunnelsDrained, logsSuppressed)
}
