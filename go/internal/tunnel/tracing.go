package tunnel

import (
	"context"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// MetadataCarrier lets OpenTelemetry propagators read and write gRPC
// metadata, so that trace context crosses the tunnel as it crosses a
// direct gRPC connection (W3C traceparent by default).
type MetadataCarrier metadata.MD

var _ propagation.TextMapCarrier = MetadataCarrier{}

func (c MetadataCarrier) Get(key string) string {
	if vs := metadata.MD(c).Get(key); len(vs) > 0 {
		return vs[0]
	}
	return ""
}

func (c MetadataCarrier) Set(key, value string) { metadata.MD(c).Set(key, value) }

func (c MetadataCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// Spans follow OpenTelemetry's RPC conventions and use the global tracer
// provider and propagator: nothing is recorded until the program sets them.
var tracer = otel.Tracer("github.com/guilhem/operator-plugin-framework/go")

func startSpan(ctx context.Context, method string, kind trace.SpanKind) (context.Context, trace.Span) {
	return tracer.Start(ctx, method[1:], spanOptions(method, kind)...)
}

// spanStart caches the start options of each method's spans: building
// them allocated 5 times per call, a tenth of what a unary call costs the
// engine when no tracer provider is set. Method names come from the peer
// on the plugin side, so the cache is bounded; past it, options are built
// per call.
var (
	spanStart       sync.Map // spanKey → []trace.SpanStartOption
	spanStartCached atomic.Int32
)

type spanKey struct {
	method string
	kind   trace.SpanKind
}

const maxCachedSpanOptions = 1024

func spanOptions(method string, kind trace.SpanKind) []trace.SpanStartOption {
	key := spanKey{method, kind}
	if opts, ok := spanStart.Load(key); ok {
		return opts.([]trace.SpanStartOption)
	}
	svc, m := splitMethod(method)
	opts := []trace.SpanStartOption{trace.WithSpanKind(kind), trace.WithAttributes(
		attribute.String("rpc.system", "grpc"),
		attribute.String("rpc.service", svc),
		attribute.String("rpc.method", m),
	)}
	if spanStartCached.Add(1) <= maxCachedSpanOptions {
		spanStart.Store(key, opts)
	}
	return opts
}

func endSpan(span trace.Span, st *status.Status) {
	if span.IsRecording() {
		span.SetAttributes(attribute.Int("rpc.grpc.status_code", int(st.Code())))
		if st.Code() != codes.OK {
			span.SetStatus(otelcodes.Error, st.Message())
		}
	}
	span.End()
}
