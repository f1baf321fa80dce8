package integration_test

import (
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// With OpenTelemetry set up, a call through the tunnel is a client span on
// the operator and a server span on the plugin, in one trace.
func TestTraceCrossesTheTunnel(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	prevTP, prevProp := otel.GetTracerProvider(), otel.GetTextMapPropagator()
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() {
		otel.SetTracerProvider(prevTP)
		otel.SetTextMapPropagator(prevProp)
		tp.Shutdown(t.Context())
	})

	op := startOperator(t)
	op.plugin(t, "traced", &testService{})
	c := op.call(t, "traced")
	ctx, parent := tp.Tracer("test").Start(ctxTimeout(t, 5*time.Second), "reconcile")
	_, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseStatus: &testgrpc.EchoStatus{Code: int32(codes.NotFound)}})
	wantCode(t, err, codes.NotFound)
	parent.End()

	var client, server sdktrace.ReadOnlySpan
	deadline := time.Now().Add(5 * time.Second)
	for (client == nil || server == nil) && time.Now().Before(deadline) {
		for _, s := range rec.Ended() {
			if s.Name() != "grpc.testing.TestService/UnaryCall" {
				continue
			}
			switch s.SpanKind() {
			case trace.SpanKindClient:
				client = s
			case trace.SpanKindServer:
				server = s
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if client == nil || server == nil {
		t.Fatalf("spans: %v", rec.Ended())
	}
	if client.Parent().SpanID() != parent.SpanContext().SpanID() {
		t.Fatal("the client span is not a child of the caller's span")
	}
	if server.Parent().SpanID() != client.SpanContext().SpanID() || server.SpanContext().TraceID() != parent.SpanContext().TraceID() {
		t.Fatal("the server span does not continue the client's trace")
	}
	for _, s := range []sdktrace.ReadOnlySpan{client, server} {
		if s.Status().Code.String() != "Error" {
			t.Fatalf("%v span status %v, want Error", s.SpanKind(), s.Status())
		}
	}
}
