package conformance

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
	"github.com/guilhem/operator-plugin-framework/go/registry"
)

// caseRun is one case being run for one SDK.
type caseRun struct {
	c     *Case
	sdk   SDK
	grace time.Duration
	log   *syncBuffer
	start time.Time

	dir, sock  string
	tls        *tlsMaterial
	op         *realOperator // the server operator, or nil
	rawOp      *rawOperator  // the raw operator, or nil
	raw        *rawConn      // the raw tunnel the frame steps use
	raws       []*rawConn    // every raw tunnel, in order
	rawStops   []func()
	plugins    []*pluginProc
	calls      map[string]*bgCall
	restarting chan error // a background restart's result
}

const conformanceService = "conformance.v1.ConformanceService"

func (r *caseRun) steps(ctx context.Context) error {
	for i := range r.c.Steps {
		s := &r.c.Steps[i]
		kind, _ := s.kind()
		label := kind
		if s.Call != nil {
			label += " " + s.Call.Method
			if s.Call.ID != "" {
				label += " " + s.Call.ID
			}
		}
		r.logf("step %d: %s", i+1, label)
		if err := r.step(ctx, s); err != nil {
			r.logf("step %d failed: %v", i+1, err)
			return fmt.Errorf("step %d (%s): %w", i+1, label, err)
		}
	}
	return nil
}

func (r *caseRun) step(ctx context.Context, s *Step) error {
	switch {
	case s.Call != nil:
		return r.call(ctx, s.Call)
	case s.WaitCall != "":
		bg, ok := r.calls[s.WaitCall]
		if !ok {
			return fmt.Errorf("no background call %q", s.WaitCall)
		}
		select {
		case <-bg.done:
		case <-ctx.Done():
			return fmt.Errorf("call %q still running: %w", s.WaitCall, ctx.Err())
		}
		return bg.spec.Expect.check(bg.res)
	case s.CancelCall != "":
		bg, ok := r.calls[s.CancelCall]
		if !ok {
			return fmt.Errorf("no background call %q", s.CancelCall)
		}
		bg.cancel()
		return nil
	case s.Registered != nil:
		return r.registered(ctx, s.Registered)
	case s.StartPlugin != nil:
		return r.startPlugin()
	case s.StopPlugin != nil:
		return r.stopPlugin(s.StopPlugin)
	case s.RestartOperator != nil:
		rs := s.RestartOperator
		if r.restarting != nil {
			return errors.New("a restart is already running")
		}
		if !rs.Background {
			return r.restart(ctx, rs)
		}
		done := make(chan error, 1)
		r.restarting = done
		go func() { done <- r.restart(ctx, rs) }()
		return nil
	case s.WaitRestart:
		if r.restarting == nil {
			return errors.New("no restart running")
		}
		err := <-r.restarting
		r.restarting = nil
		return err
	case s.Rejections != nil:
		if got := r.op.rejected.Load(); got != int64(*s.Rejections) {
			return fmt.Errorf("the server refused %d registrations, want %d", got, *s.Rejections)
		}
		return nil
	case s.Sleep > 0:
		return sleep(ctx, time.Duration(s.Sleep))
	case s.RawConnect != nil:
		return r.rawConnect(ctx, s.RawConnect)
	case s.Accept != nil:
		return r.accept(ctx, s.Accept)
	case s.UseRaw != 0:
		if s.UseRaw < 1 || s.UseRaw > len(r.raws) {
			return fmt.Errorf("no raw tunnel %d (%d opened)", s.UseRaw, len(r.raws))
		}
		r.raw = r.raws[s.UseRaw-1]
		return nil
	}
	// The frame steps.
	rc := r.raw
	if rc == nil {
		return errors.New("no raw tunnel: use raw_connect or accept first")
	}
	switch {
	case s.Send != nil:
		frames := make([]*pb.Frame, len(s.Send))
		for i, spec := range s.Send {
			f, err := rc.buildFrame(spec)
			if err != nil {
				return fmt.Errorf("frame %d: %w", i, err)
			}
			frames[i] = f
			r.logf("raw %s: sending %s", rc.side, describeFrame(f))
		}
		return rc.sendFrames(frames)
	case s.SendBytes != "":
		b, err := decodeB64(s.SendBytes)
		if err != nil {
			return fmt.Errorf("send_bytes is base64: %w", err)
		}
		r.logf("raw %s: sending %d raw bytes", rc.side, len(b))
		return rc.sendBytes(b)
	case s.Await != nil:
		_, err := rc.await(ctx, *s.Await)
		return err
	case s.ExpectSilence != nil:
		return rc.expectSilence(ctx, s.ExpectSilence.For.D(300*time.Millisecond), s.ExpectSilence.Kinds)
	case s.ExpectEnd != nil:
		e := s.ExpectEnd
		how, err := rc.awaitEnd(ctx, e.Within.D(3*time.Second))
		if err != nil {
			return err
		}
		if e.Code != "" || e.MessageContains != "" {
			st := endStatus(how)
			want, _ := codeByName(e.Code)
			if e.Code != "" && st.Code() != want {
				return fmt.Errorf("the stream ended with %s (%q), want %s", codeName(st.Code()), st.Message(), e.Code)
			}
			if !strings.Contains(st.Message(), e.MessageContains) {
				return fmt.Errorf("the stream ended with %q, want it to contain %q", st.Message(), e.MessageContains)
			}
		}
		return nil
	case s.MaxBatch > 0:
		rc.mu.Lock()
		largest := rc.largest
		rc.mu.Unlock()
		if largest > int(s.MaxBatch) {
			return fmt.Errorf("received a batch of %d bytes, want at most %d", largest, s.MaxBatch)
		}
		return nil
	case s.CloseRaw != nil:
		code, err := codeByName(s.CloseRaw.Code)
		if err != nil {
			return err
		}
		rc.closeFn(status.New(code, s.CloseRaw.Message))
		return nil
	}
	return errors.New("empty step")
}

// restart stops the server operator and starts a new one on its socket.
func (r *caseRun) restart(ctx context.Context, rs *RestartStep) error {
	if err := r.op.stop(rs.Mode == "crash"); err != nil {
		return fmt.Errorf("stopping the server: %w", err)
	}
	r.logf("server stopped (%s)", rs.Mode)
	if err := sleep(ctx, time.Duration(rs.DownFor)); err != nil {
		return err
	}
	if err := r.op.start(); err != nil {
		return err
	}
	r.logf("server started again")
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *caseRun) call(ctx context.Context, cs *CallStep) error {
	name := cs.Plugin
	if name == "" {
		name = r.c.pluginName()
	}
	conn := r.op.registry().Plugin(name)
	switch {
	case cs.Parallel > 0:
		return parallel(ctx, conn, cs)
	case cs.Background || cs.Hold:
		if _, dup := r.calls[cs.ID]; dup {
			return fmt.Errorf("call id %q used twice", cs.ID)
		}
		cctx, cancel := context.WithCancel(ctx)
		var hold chan struct{}
		if cs.Hold {
			hold = make(chan struct{})
			go func() {
				<-cctx.Done()
				close(hold)
			}()
		}
		bg := &bgCall{spec: cs, cancel: cancel, done: make(chan struct{})}
		r.calls[cs.ID] = bg
		go func() {
			defer close(bg.done)
			bg.res = doCall(cctx, conn, cs, hold)
			r.logf("background call %s ended: %s %q", cs.ID, codeName(bg.res.st.Code()), bg.res.st.Message())
		}()
		return nil
	}
	res := doCall(ctx, conn, cs, nil)
	r.logf("call %s ended: %s %q after %v", cs.Method, codeName(res.st.Code()), res.st.Message(), res.took.Round(time.Millisecond))
	return cs.Expect.check(res)
}

// registered waits until the registry lists the wanted instances.
func (r *caseRun) registered(ctx context.Context, rs *RegisteredStep) error {
	want := 1
	if rs.Count != nil {
		want = *rs.Count
	}
	within := rs.Within.D(10 * time.Second)
	deadline := time.Now().Add(within)
	name := r.c.pluginName()
	before := map[string]bool{}
	startReg := r.op.registry()
	if rs.New {
		for _, inst := range startReg.List() {
			before[inst.ID] = true
		}
	}
	for {
		reg := r.op.registry()
		var list []registry.Instance
		for _, inst := range reg.List() {
			if inst.Name == name {
				list = append(list, inst)
			}
		}
		fresh := !rs.New || reg != startReg
		for _, inst := range list {
			if !before[inst.ID] {
				fresh = true
			}
		}
		if len(list) == want && fresh {
			for _, inst := range list {
				if err := match("instance", rs.Instance, instanceMap(inst)); rs.Instance != nil && err != nil {
					return err
				}
			}
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d instances of plugin %q registered after %v, want %d%s", len(list), name, within, want, map[bool]string{true: " new ones"}[rs.New])
		}
		if err := sleep(ctx, 10*time.Millisecond); err != nil {
			return err
		}
	}
}

func instanceMap(inst registry.Instance) map[string]any {
	services := make([]any, len(inst.Services))
	for i, s := range inst.Services {
		services[i] = s
	}
	labels := map[string]any{}
	for k, v := range inst.Labels {
		labels[k] = v
	}
	return map[string]any{
		"id": inst.ID, "name": inst.Name, "version": inst.Version,
		"services": services, "labels": labels, "identity": inst.Identity,
	}
}

func (r *caseRun) stopPlugin(ss *StopStep) error {
	if ss.Index < 0 || ss.Index >= len(r.plugins) {
		return fmt.Errorf("no plugin %d", ss.Index)
	}
	p := r.plugins[ss.Index]
	if p.exited() {
		p.checked = true
		return fmt.Errorf("plugin %d had already exited: %v", p.index, p.err)
	}
	p.terminate()
	r.logf("sent SIGTERM to plugin %d", p.index)
	if ss.Background {
		return nil
	}
	p.checked = true
	err := p.wait(ss.Within.D(r.grace))
	r.logf("plugin %d exited after %v", p.index, time.Since(p.termAt).Round(time.Millisecond))
	return err
}

// rawConnect opens a tunnel to the server as a raw plugin.
func (r *caseRun) rawConnect(ctx context.Context, rs *RawConnectStep) error {
	var creds credentials.TransportCredentials
	if r.tls != nil {
		creds = r.tls.clientCreds()
	}
	rc, stop, err := dialRaw(ctx, r.target(), creds, r.c.Operator.Token, r.logf)
	if err != nil {
		return err
	}
	r.raw = rc
	r.raws = append(r.raws, rc)
	r.rawStops = append(r.rawStops, stop)
	rc.answerPings.Store(rs.AnswerPings == nil || *rs.AnswerPings)
	if rs.Hello != nil && !*rs.Hello {
		return nil
	}
	hello, err := helloFrame(rs.Settings, plainSizes)
	if err != nil {
		return err
	}
	frames := []*pb.Frame{hello}
	register := rs.Register == nil || *rs.Register
	if register {
		name := rs.Name
		if name == "" {
			name = r.c.pluginName()
		}
		services := rs.Services
		if services == nil {
			services = []string{conformanceService}
		}
		frames = append(frames, &pb.Frame{Kind: &pb.Frame_Register{Register: &pb.Register{Name: name, Version: "raw", Services: services}}})
	}
	for _, f := range frames {
		r.logf("raw plugin: sending %s", describeFrame(f))
	}
	if err := rc.sendFrames(frames); err != nil {
		return err
	}
	if _, err := rc.await(ctx, FrameMatch{"hello": map[string]any{"min_version": map[string]any{"$between": []any{0, protocolVersion}}, "max_version": map[string]any{"$between": []any{protocolVersion, 1 << 31}}}}); err != nil {
		return err
	}
	if register {
		if _, err := rc.await(ctx, FrameMatch{"register_ack": nil}); err != nil {
			return err
		}
	}
	return nil
}

// accept takes the plugin's next tunnel to the raw operator.
func (r *caseRun) accept(ctx context.Context, as *AcceptStep) error {
	within := as.Within.D(5 * time.Second)
	var rc *rawConn
	select {
	case rc = <-r.rawOp.conns:
	case <-time.After(within):
		return fmt.Errorf("the plugin opened no tunnel within %v", within)
	case <-ctx.Done():
		return ctx.Err()
	}
	r.raw = rc
	r.raws = append(r.raws, rc)
	rc.answerPings.Store(as.AnswerPings == nil || *as.AnswerPings)
	if as.Handshake != nil && !*as.Handshake {
		return nil
	}
	// The plugin's Hello first; its Register once our Hello is in.
	first, err := rc.next(ctx, 5*time.Second)
	if err != nil {
		return fmt.Errorf("the plugin's first frame: %w", err)
	}
	if first.GetHello() == nil {
		return fmt.Errorf("the plugin's first frame is %s, want hello", describeFrame(first))
	}
	if h := first.GetHello(); h.GetMinVersion() > protocolVersion || h.GetMaxVersion() < protocolVersion {
		return fmt.Errorf("the plugin's hello %s does not offer version %d", describeFrame(first), protocolVersion)
	}
	helloSpec := as.Hello
	var hello *pb.Frame
	if helloSpec != nil {
		f, err := rc.buildFrame(FrameSpec{"hello": helloSpec})
		if err != nil {
			return err
		}
		hello = f
	} else {
		if hello, err = helloFrame(r.rawSettings(), plainSizes); err != nil {
			return err
		}
	}
	r.logf("raw operator: sending %s", describeFrame(hello))
	if err := rc.sendFrames([]*pb.Frame{hello}); err != nil {
		return err
	}
	if as.Register == false {
		return nil // a Hello the plugin must refuse: no Register is due
	}
	second, err := rc.next(ctx, 5*time.Second)
	if err != nil {
		return fmt.Errorf("the plugin's frame after the operator's hello: %w", err)
	}
	if second.GetRegister() == nil {
		return fmt.Errorf("the plugin's frame after the operator's hello is %s, want register", describeFrame(second))
	}
	wantReg := as.Register
	if wantReg == nil {
		wantReg = map[string]any{
			"name":     r.c.pluginName(),
			"version":  PluginVersion,
			"services": map[string]any{"$contains": []any{conformanceService}},
		}
	}
	if err := match("register", wantReg, matchable(second.GetRegister().ProtoReflect())); err != nil {
		return err
	}
	if as.Ack != nil && !*as.Ack {
		return nil
	}
	ack := &pb.Frame{Kind: &pb.Frame_RegisterAck{RegisterAck: &pb.RegisterAck{InstanceId: "raw-1"}}}
	r.logf("raw operator: sending %s", describeFrame(ack))
	return rc.sendFrames([]*pb.Frame{ack})
}

// rawSettings are the raw operator's Hello settings, from the case.
func (r *caseRun) rawSettings() map[string]any {
	s := map[string]any{}
	o := r.c.Operator
	if o.MaxMessageSize > 0 {
		s["max_message_size"] = int(o.MaxMessageSize)
	}
	if o.InitialWindowSize > 0 {
		s["initial_window_size"] = int(o.InitialWindowSize)
	}
	if o.HeartbeatInterval > 0 {
		s["heartbeat_interval"] = time.Duration(o.HeartbeatInterval).String()
	}
	return s
}

// next removes and returns the first frame received, waiting for it.
func (rc *rawConn) next(ctx context.Context, within time.Duration) (*pb.Frame, error) {
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		rc.mu.Lock()
		if len(rc.queue) > 0 {
			f := rc.queue[0]
			rc.queue = rc.queue[1:]
			rc.mu.Unlock()
			return f, nil
		}
		notify, ended, endErr := rc.notify, rc.ended, rc.endErr
		rc.mu.Unlock()
		if ended {
			return nil, fmt.Errorf("the stream ended: %v", endErr)
		}
		select {
		case <-notify:
		case <-timer.C:
			return nil, fmt.Errorf("nothing received within %v", within)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
