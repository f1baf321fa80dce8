package registry

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Metrics, served with controller-runtime's own on the manager's metrics
// endpoint. Every call is counted once, whatever its kind and however it
// ends (see call).
var (
	instancesGauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "plugin_framework",
		Name:      "instances",
		Help:      "Plugin instances connected, by plugin name.",
	}, []string{"plugin"})
	callsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "plugin_framework",
		Name:      "calls_total",
		Help:      "Calls made to plugins, by plugin, full method and gRPC status code.",
	}, []string{"plugin", "method", "code"})
	callSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "plugin_framework",
		Name:      "call_duration_seconds",
		Help:      "Duration of calls to plugins, until their status, by plugin and full method.",
		Buckets:   prometheus.ExponentialBuckets(0.0005, 2, 16),
	}, []string{"plugin", "method"})
)

func init() {
	metrics.Registry.MustRegister(instancesGauge, callsTotal, callSeconds)
}

// observe records the end of a call.
func observe(plugin, method string, start time.Time, err error) {
	callsTotal.WithLabelValues(plugin, method, status.Code(err).String()).Inc()
	callSeconds.WithLabelValues(plugin, method).Observe(time.Since(start).Seconds())
}
