package integration_test

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

func TestMetrics(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "metered", &testService{})
	c := op.call(t, "metered")
	for range 3 {
		if _, err := c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{ResponseStatus: &testgrpc.EchoStatus{Code: int32(codes.NotFound)}})
	wantCode(t, err, codes.NotFound)

	mfs, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["plugin"] != "metered" {
				continue
			}
			switch mf.GetName() {
			case "plugin_framework_calls_total":
				counts[labels["code"]] += m.GetCounter().GetValue()
			case "plugin_framework_instances":
				counts["instances"] = m.GetGauge().GetValue()
			}
		}
	}
	if counts["OK"] != 3 || counts["NotFound"] != 1 || counts["instances"] != 1 {
		t.Fatalf("metrics %v, want 3 OK, 1 NotFound, 1 instance", counts)
	}
}
