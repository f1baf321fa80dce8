package tunnel

import (
	"context"
	"fmt"
	"reflect"
	"runtime/debug"
	"slices"
	"time"

	"github.com/go-logr/logr"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Dispatcher serves the calls that arrive through a tunnel with gRPC service
// implementations, as a grpc.Server would: it is a grpc.ServiceRegistrar,
// runs server interceptors, and gives handlers contexts with the caller's
// deadline and metadata that are cancelled when the caller cancels.
type Dispatcher struct {
	services map[string]*service
	unary    grpc.UnaryServerInterceptor
	stream   grpc.StreamServerInterceptor
	log      logr.Logger
}

type service struct {
	impl    any
	methods map[string]*grpc.MethodDesc
	streams map[string]*grpc.StreamDesc
}

var _ grpc.ServiceRegistrar = (*Dispatcher)(nil)

// NewDispatcher returns a Dispatcher with no services. Interceptors run in
// the order given, the first outermost.
func NewDispatcher(log logr.Logger, unary []grpc.UnaryServerInterceptor, stream []grpc.StreamServerInterceptor) *Dispatcher {
	return &Dispatcher{
		services: map[string]*service{},
		unary:    chainUnary(unary),
		stream:   chainStream(stream),
		log:      log,
	}
}

// Register adds a service. impl must implement desc.HandlerType.
func (d *Dispatcher) Register(desc *grpc.ServiceDesc, impl any) error {
	if desc == nil {
		return fmt.Errorf("nil service description")
	}
	if impl == nil {
		return fmt.Errorf("service %s: nil implementation", desc.ServiceName)
	}
	if desc.HandlerType != nil {
		ht := reflect.TypeOf(desc.HandlerType).Elem()
		if !reflect.TypeOf(impl).Implements(ht) {
			return fmt.Errorf("service %s: %T does not implement %v", desc.ServiceName, impl, ht)
		}
	}
	if _, dup := d.services[desc.ServiceName]; dup {
		return fmt.Errorf("service %s registered twice", desc.ServiceName)
	}
	svc := &service{impl: impl, methods: map[string]*grpc.MethodDesc{}, streams: map[string]*grpc.StreamDesc{}}
	for i := range desc.Methods {
		svc.methods[desc.Methods[i].MethodName] = &desc.Methods[i]
	}
	for i := range desc.Streams {
		svc.streams[desc.Streams[i].StreamName] = &desc.Streams[i]
	}
	d.services[desc.ServiceName] = svc
	return nil
}

// RegisterService implements grpc.ServiceRegistrar; like grpc.Server it
// panics on a misuse that Register would report.
func (d *Dispatcher) RegisterService(desc *grpc.ServiceDesc, impl any) {
	if err := d.Register(desc, impl); err != nil {
		panic(err)
	}
}

// Services lists the registered service names, sorted.
func (d *Dispatcher) Services() []string {
	names := make([]string, 0, len(d.services))
	for n := range d.services {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// start runs the handler of a stream the peer opened, in its own goroutine.
func (d *Dispatcher) start(s *stream, md metadata.MD, timeout time.Duration) {
	ctx := metadata.NewIncomingContext(s.t.ctx, md)
	ctx = otel.GetTextMapPropagator().Extract(ctx, MetadataCarrier(md))
	ctx, span := startSpan(ctx, s.method, trace.SpanKindServer)
	var cancelTimeout context.CancelFunc = func() {}
	if timeout > 0 {
		ctx, cancelTimeout = context.WithTimeout(ctx, timeout)
	}
	ss := &serverStream{s: s}
	ctx = grpc.NewContextWithServerTransportStream(ctx, transportStream{ss})
	ctx, cancel := context.WithCancelCause(ctx)
	s.ctx, s.cancel = ctx, cancel
	go func() {
		defer cancelTimeout()
		defer cancel(nil)
		defer s.t.removeStream(s)
		err := d.serve(ctx, ss)
		ss.finish(err)
		endSpan(span, handlerStatus(err))
	}()
}

// serve runs the method's handler and returns its result; a panic becomes
// INTERNAL, as a crashed handler must not take the plugin down.
func (d *Dispatcher) serve(ctx context.Context, ss *serverStream) (err error) {
	defer func() {
		if r := recover(); r != nil {
			d.log.Error(fmt.Errorf("%v", r), "handler panicked", "method", ss.s.method, "stack", string(debug.Stack()))
			err = status.Errorf(codes.Internal, "handler panicked: %v", r)
		}
	}()
	svcName, method := splitMethod(ss.s.method)
	svc, ok := d.services[svcName]
	if !ok {
		return status.Errorf(codes.Unimplemented, "unknown service %s", svcName)
	}
	if md, ok := svc.methods[method]; ok {
		return d.serveUnary(ctx, ss, svc, md)
	}
	if sd, ok := svc.streams[method]; ok {
		ss.clientStreams = sd.ClientStreams
		info := &grpc.StreamServerInfo{FullMethod: ss.s.method, IsClientStream: sd.ClientStreams, IsServerStream: sd.ServerStreams}
		if d.stream != nil {
			return d.stream(svc.impl, ss, info, sd.Handler)
		}
		return sd.Handler(svc.impl, ss)
	}
	return status.Errorf(codes.Unimplemented, "unknown method %s for service %s", method, svcName)
}

func (d *Dispatcher) serveUnary(ctx context.Context, ss *serverStream, svc *service, md *grpc.MethodDesc) error {
	dec := ss.RecvMsg
	resp, err := md.Handler(svc.impl, ctx, dec, d.unary)
	if err != nil {
		return err
	}
	return ss.reply(resp)
}

func chainUnary(ints []grpc.UnaryServerInterceptor) grpc.UnaryServerInterceptor {
	if len(ints) == 0 {
		return nil
	}
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		next := handler
		for i := len(ints) - 1; i >= 0; i-- {
			in, h := ints[i], next
			next = func(ctx context.Context, req any) (any, error) { return in(ctx, req, info, h) }
		}
		return next(ctx, req)
	}
}

func chainStream(ints []grpc.StreamServerInterceptor) grpc.StreamServerInterceptor {
	if len(ints) == 0 {
		return nil
	}
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		next := handler
		for i := len(ints) - 1; i >= 0; i-- {
			in, h := ints[i], next
			next = func(srv any, ss grpc.ServerStream) error { return in(srv, ss, info, h) }
		}
		return next(srv, ss)
	}
}
