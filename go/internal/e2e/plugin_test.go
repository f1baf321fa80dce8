package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
)

// testService serves grpc.testing.TestService and records the issuer of
// the operator's certificate each call came through.
type testService struct {
	testservice.Service
	mu      sync.Mutex
	issuers map[string]int
}

func newTestService() *testService {
	s := &testService{}
	s.Observe = s.seen
	return s
}

func (s *testService) seen(ctx context.Context) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.issuers == nil {
		s.issuers = map[string]int{}
	}
	s.issuers[info.State.PeerCertificates[0].Issuer.CommonName]++
}

func (s *testService) issuerCounts() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int{}
	for k, v := range s.issuers {
		out[k] = v
	}
	return out
}

var payload = testservice.Payload

// everyKind makes one call of each RPC kind through c and checks the
// answers.
func everyKind(ctx context.Context, c testgrpc.TestServiceClient, opts ...grpc.CallOption) error {
	if _, err := c.EmptyCall(ctx, &testgrpc.Empty{}, opts...); err != nil {
		return err
	}
	var header metadata.MD
	r, err := c.UnaryCall(metadata.AppendToOutgoingContext(ctx, "x-echo", "hi"), &testgrpc.SimpleRequest{ResponseSize: 1000}, append(opts, grpc.Header(&header))...)
	if err != nil {
		return err
	}
	if len(r.GetPayload().GetBody()) != 1000 || len(header.Get("x-echo")) != 1 {
		return errors.New("unary: wrong answer")
	}
	out, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}, {Size: 100}, {Size: 100000}}}, opts...)
	if err != nil {
		return err
	}
	for i, want := range []int{1, 100, 100000} {
		m, err := out.Recv()
		if err != nil {
			return err
		}
		if len(m.GetPayload().GetBody()) != want {
			return errors.New("server streaming: wrong size")
		}
		_ = i
	}
	if _, err := out.Recv(); !errors.Is(err, io.EOF) {
		return errors.Join(errors.New("server streaming: no end"), err)
	}
	in, err := c.StreamingInputCall(ctx, opts...)
	if err != nil {
		return err
	}
	for _, n := range []int32{10, 20, 30000} {
		if err := in.Send(&testgrpc.StreamingInputCallRequest{Payload: payload(n)}); err != nil {
			return err
		}
	}
	agg, err := in.CloseAndRecv()
	if err != nil {
		return err
	}
	if agg.AggregatedPayloadSize != 30030 {
		return errors.New("client streaming: wrong total")
	}
	bidi, err := c.FullDuplexCall(ctx, opts...)
	if err != nil {
		return err
	}
	for _, n := range []int32{5, 50000} {
		if err := bidi.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: n}}}); err != nil {
			return err
		}
		m, err := bidi.Recv()
		if err != nil {
			return err
		}
		if int32(len(m.GetPayload().GetBody())) != n {
			return errors.New("bidi: wrong size")
		}
	}
	if err := bidi.CloseSend(); err != nil {
		return err
	}
	if _, err := bidi.Recv(); !errors.Is(err, io.EOF) {
		return errors.Join(errors.New("bidi: no end"), err)
	}
	return nil
}

// errorLog is a logr sink that keeps the errors a client logs.
type errorLog struct {
	mu   sync.Mutex
	errs []error
}

func (l *errorLog) logger() logr.Logger { return logr.New(errSink{l}) }

func (l *errorLog) all() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]error(nil), l.errs...)
}

type errSink struct{ l *errorLog }

func (s errSink) Init(logr.RuntimeInfo) {}
func (s errSink) Enabled(int) bool      { return true }
func (s errSink) Info(_ int, _ string, kv ...any) {
	for i := 0; i+1 < len(kv); i += 2 {
		if err, ok := kv[i+1].(error); ok && kv[i] == "error" {
			s.l.mu.Lock()
			s.l.errs = append(s.l.errs, err)
			s.l.mu.Unlock()
		}
	}
}
func (s errSink) Error(err error, _ string, _ ...any) {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
	s.l.errs = append(s.l.errs, err)
}
func (s errSink) WithValues(...any) logr.LogSink { return s }
func (s errSink) WithName(string) logr.LogSink   { return s }

// tlsCreds trusts the CA in caFile for serverName.
func tlsCreds(t testing.TB, caFile, serverName string) credentials.TransportCredentials {
	t.Helper()
	pemData, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		t.Fatal("no CA")
	}
	return credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: serverName, MinVersion: tls.VersionTLS12})
}

// rawResult is what a hand-made Connect stream saw.
type rawResult struct {
	acked  bool           // RegisterAck received
	reject *status.Status // RegisterReject received
	final  *status.Status // how the stream ended (nil after an ack)
}

func (r rawResult) String() string {
	return fmt.Sprintf("acked=%v reject=%v final=%v", r.acked, r.reject, r.final)
}

// rawConnect opens a Connect stream by hand with ordinary generated code,
// presents token (none if empty), registers name, and reports the
// operator's answer with its exact status.
func rawConnect(t testing.TB, target string, creds credentials.TransportCredentials, token, name string) rawResult {
	t.Helper()
	var md metadata.MD
	if token != "" {
		md = metadata.Pairs("authorization", "Bearer "+token)
	}
	return rawConnectFrom(t, target, "", creds, md, name)
}

// rawConnectFrom is rawConnect from a source address of the test's choice
// (any if empty), with the metadata md.
func rawConnectFrom(t testing.TB, target, from string, creds credentials.TransportCredentials, md metadata.MD, name string) rawResult {
	t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if from != "" {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return d.DialContext(ctx, "tcp", a) }))
		target = "passthrough:///" + target
	}
	cc, err := grpc.NewClient(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	ctx = metadata.NewOutgoingContext(ctx, md)
	stream, err := pb.NewPluginFrameworkServiceClient(cc).Connect(ctx)
	if err != nil {
		return rawResult{final: status.Convert(err)}
	}
	err = stream.Send(&pb.ConnectRequest{Frames: []*pb.Frame{
		{Kind: &pb.Frame_Hello{Hello: &pb.Hello{MinVersion: 2, MaxVersion: 2, Settings: &pb.Settings{}}}},
		{Kind: &pb.Frame_Register{Register: &pb.Register{Name: name, Version: "v1", Services: []string{"grpc.testing.TestService"}}}},
	}})
	if errors.Is(err, io.EOF) {
		// The operator ended the stream first; Recv tells why.
		err = nil
	}
	var res rawResult
	for err == nil {
		var m *pb.ConnectResponse
		if m, err = stream.Recv(); err != nil {
			break
		}
		for _, f := range m.GetFrames() {
			switch k := f.GetKind().(type) {
			case *pb.Frame_RegisterAck:
				res.acked = true
			case *pb.Frame_RegisterReject:
				res.reject = status.FromProto(k.RegisterReject.GetStatus())
				_ = stream.CloseSend() // as the plugin's tunnel does once refused
			}
		}
		if res.acked {
			return res
		}
	}
	res.final = status.Convert(err)
	return res
}
