package conformance

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

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
	op         *realOperator   // the server operator (replica 0), or nil
	ops        []*realOperator // every replica's server
	rawOp      *rawOperator    // the raw operator (replica 0), or nil
	rawOps     []*rawOperator  // every raw operator
	replicas   *replicaSet     // the loopback addresses, with several operators
	raw        *rawConn        // the raw tunnel the frame steps use
	raws       []*rawConn      // every raw tunnel, in order
	rawStops   []func()
	plugins    []*pluginProc
	calls      map[string]*bgCall
	restarting chan error // a background restart's result
	seed       uint64     // the case's random seed (caseSeed)
	runSeed    uint64     // the run's, from which seed derives
	stepIndex  int        // the step running, from 0
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
		r.stepIndex = i
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
	case s.Integrity != nil:
		seed := r.seed + uint64(r.stepIndex)
		var conn grpc.ClientConnInterface
		if r.op != nil {
			conn = r.op.registry().Plugin(r.c.pluginName())
		} else {
			if r.raw == nil {
				return errors.New("integrity with the raw operator needs a tunnel: use accept first")
			}
			rc, err := newRawCaller(r.raw, seed)
			if err != nil {
				return err
			}
			conn = rc
		}
		replay := fmt.Sprintf("the same calls again: --seed %d --run '^%s$'", r.runSeed, regexp.QuoteMeta(r.c.Name))
		return s.Integrity.run(ctx, conn, seed, replay, r.logf)
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
		if bg.repeated {
			return bg.err
		}
		return bg.spec.Expect.check(bg.res)
	case s.CancelCall != "":
		bg, ok := r.calls[s.CancelCall]
		if !ok {
			return fmt.Errorf("no background call %q", s.CancelCall)
		}
		bg.cancel()
		return nil
	case s.Registrations != nil:
		if err := r.replicaIndex(s.Registrations.Replica); err != nil {
			return err
		}
		got := r.ops[s.Registrations.Replica].registrations.Load()
		return match(fmt.Sprintf("registrations seen by server %d", s.Registrations.Replica), s.Registrations.Count, got)
	case s.Accepted != nil:
		if err := r.replicaIndex(s.Accepted.Replica); err != nil {
			return err
		}
		got := r.ops[s.Accepted.Replica].accepted.Load()
		return match(fmt.Sprintf("connections accepted by server %d", s.Accepted.Replica), s.Accepted.Connections, got)
	case s.Forwarder != nil:
		if r.replicas == nil || s.Forwarder.Index < 0 || s.Forwarder.Index >= len(r.replicas.forwarders) {
			return fmt.Errorf("no forwarder %d", s.Forwarder.Index)
		}
		got := r.replicas.forwarders[s.Forwarder.Index].count.Load()
		return match(fmt.Sprintf("connections relayed by forwarder %d", s.Forwarder.Index), s.Forwarder.Connections, got)
	case s.NoNewTunnel > 0:
		return r.noNewTunnel(ctx, time.Duration(s.NoNewTunnel))
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
		frames, err := rc.buildFrames(s.Send)
		if err != nil {
			return err
		}
		for i, f := range frames {
			if i == 8 && len(frames) > 10 {
				r.logf("raw %s: ... and %d more frames, %d in this batch", rc.side, len(frames)-i-1, len(frames))
				break
			}
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
		return rc.expectSilence(ctx, s.ExpectSilence.For.D(300*time.Millisecond), s.ExpectSilence.Kinds, s.ExpectSilence.Stream)
	case s.Flood != nil:
		f, err := rc.buildFrame(s.Flood.Frame)
		if err != nil {
			return err
		}
		sent := 0
		for sent < s.Flood.Frames {
			batch := make([]*pb.Frame, 0, min(maxBatchFrames, s.Flood.Frames-sent))
			for range cap(batch) {
				g := proto.Clone(f).(*pb.Frame)
				if f.GetStreamId() != 0 {
					g.StreamId = f.GetStreamId() + uint64(2*sent)
				}
				batch = append(batch, g)
				sent++
			}
			if err := rc.sendFrames(batch); err != nil {
				r.logf("raw %s: the flood stopped after %d frames: %v", rc.side, sent-len(batch), err)
				return nil
			}
		}
		r.logf("raw %s: flooded %d frames of %s", rc.side, sent, describeFrame(f))
		return nil
	case s.ExpectEnd != nil:
		e := s.ExpectEnd
		rc.mu.Lock()
		rc.pauseUntil = time.Time{} // reading again, to see the end
		rc.mu.Unlock()
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
	case s.MaxFrames > 0:
		rc.mu.Lock()
		most := rc.mostFrames
		rc.mu.Unlock()
		if most > s.MaxFrames {
			return fmt.Errorf("received a batch of %d frames, want at most %d", most, s.MaxFrames)
		}
		return nil
	case s.PauseReading > 0:
		rc.mu.Lock()
		rc.pauseUntil = time.Now().Add(time.Duration(s.PauseReading))
		rc.mu.Unlock()
		return nil
	case s.FrameCounts != nil:
		rc.mu.Lock()
		got := map[string]any{}
		for k := range frameKinds {
			got[k] = int64(rc.kinds[k])
		}
		got["unknown"] = int64(rc.kinds["unknown"])
		rc.mu.Unlock()
		for k := range s.FrameCounts {
			if _, ok := got[k]; !ok {
				return fmt.Errorf("frame_counts: no frame kind %q", k)
			}
		}
		return match("frames received", s.FrameCounts, got)
	case s.OpensInOrder != nil:
		rc.mu.Lock()
		var ids []uint64
		rest := rc.queue[:0:0]
		for _, f := range rc.queue {
			if f.GetOpen() != nil {
				ids = append(ids, f.GetStreamId())
			} else {
				rest = append(rest, f)
			}
		}
		rc.queue = rest
		rc.mu.Unlock()
		parity := uint64(1) // the operator's
		if rc.side == "operator" {
			parity = 0
		}
		for i, id := range ids {
			if id%2 != parity || (i > 0 && id <= ids[i-1]) {
				return fmt.Errorf("StreamOpen ids out of order or of the wrong parity: %v", ids)
			}
		}
		if len(ids) < s.OpensInOrder.Min {
			return fmt.Errorf("%d StreamOpen frames, want at least %d", len(ids), s.OpensInOrder.Min)
		}
		for i := 1; s.OpensInOrder.Consecutive && i < len(ids); i++ {
			if ids[i] != ids[i-1]+2 {
				return fmt.Errorf("StreamOpen ids not consecutive: %d after %d (%v)", ids[i], ids[i-1], ids)
			}
		}
		return nil
	case s.Credit != nil:
		return rc.checkCredit(s.Credit)
	case s.AwaitMessage != nil:
		return rc.awaitMessage(ctx, s.AwaitMessage)
	case s.MaxBatch > 0:
		rc.mu.Lock()
		largest := rc.largest
		rc.mu.Unlock()
		if largest > int(s.MaxBatch) {
			return fmt.Errorf("received a batch of %d bytes, want at most %d", largest, s.MaxBatch)
		}
		return nil
	case s.CloseRaw != nil:
		if s.CloseRaw.HalfClose {
			if rc.side != "plugin" {
				return errors.New("close_raw half_close: only the raw plugin half-closes")
			}
			rc.closeFn(nil)
			return nil
		}
		code, err := codeByName(s.CloseRaw.Code)
		if err != nil {
			return err
		}
		rc.closeFn(status.New(code, s.CloseRaw.Message))
		return nil
	case s.ConnectCall != nil:
		if rc.side != "operator" {
			return errors.New("connect_call: only the raw operator sees the plugin's Connect call")
		}
		if s.ConnectCall.Deadline != nil && *s.ConnectCall.Deadline != rc.connectDeadline {
			return fmt.Errorf("the Connect call has a deadline: %v, want %v", rc.connectDeadline, *s.ConnectCall.Deadline)
		}
		return checkMetadata("Connect metadata", s.ConnectCall.Metadata, rc.connectMD)
	case s.OneBatch != 0:
		rc.mu.Lock()
		n := len(rc.batchesOf[uint64(s.OneBatch)])
		rc.mu.Unlock()
		if n != 1 {
			return fmt.Errorf("the frames of stream %d came in %d batches, want 1", s.OneBatch, n)
		}
		return nil
	}
	return errors.New("empty step")
}

// restart stops a server operator and starts a new one on its socket.
func (r *caseRun) restart(ctx context.Context, rs *RestartStep) error {
	if err := r.replicaIndex(rs.Replica); err != nil || len(r.ops) == 0 {
		return errors.Join(err, errors.New("restart_operator needs the server operator"))
	}
	op := r.ops[rs.Replica]
	if err := op.stop(rs.Mode == "crash"); err != nil {
		return fmt.Errorf("stopping server %d: %w", rs.Replica, err)
	}
	r.logf("server %d stopped (%s)", rs.Replica, rs.Mode)
	if err := sleep(ctx, time.Duration(rs.DownFor)); err != nil {
		return err
	}
	if err := op.start(); err != nil {
		return err
	}
	r.logf("server %d started again", rs.Replica)
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
	if err := r.replicaIndex(cs.Replica); err != nil {
		return err
	}
	conn := r.ops[cs.Replica].registry().Plugin(name)
	switch {
	case cs.RepeatFor > 0 && cs.Background:
		if _, dup := r.calls[cs.ID]; dup {
			return fmt.Errorf("call id %q used twice", cs.ID)
		}
		cctx, cancel := context.WithCancel(ctx)
		bg := &bgCall{spec: cs, cancel: cancel, done: make(chan struct{}), repeated: true}
		r.calls[cs.ID] = bg
		go func() {
			defer close(bg.done)
			bg.err = repeatCalls(cctx, conn, cs)
			r.logf("background calls %s ended: %v", cs.ID, bg.err)
		}()
		return nil
	case cs.RepeatFor > 0:
		return repeatCalls(ctx, conn, cs)
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

// registered waits until the registry of each replica asked for lists
// the wanted instances.
func (r *caseRun) registered(ctx context.Context, rs *RegisteredStep) error {
	if rs.Replica != nil {
		if err := r.replicaIndex(*rs.Replica); err != nil {
			return err
		}
		return r.registeredOn(ctx, rs, *rs.Replica)
	}
	// Every replica at once, so that "within" bounds them all together.
	errs := make([]error, len(r.ops))
	var wg sync.WaitGroup
	for i := range r.ops {
		wg.Go(func() { errs[i] = r.registeredOn(ctx, rs, i) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (r *caseRun) registeredOn(ctx context.Context, rs *RegisteredStep, replica int) error {
	op := r.ops[replica]
	want := 1
	if rs.Count != nil {
		want = *rs.Count
	}
	within := rs.Within.D(10 * time.Second)
	deadline := time.Now().Add(within)
	name := r.c.pluginName()
	before := map[string]bool{}
	startReg := op.registry()
	if rs.New {
		for _, inst := range startReg.List() {
			before[inst.ID] = true
		}
	}
	where := ""
	if len(r.ops) > 1 {
		where = fmt.Sprintf(" on server %d", replica)
	}
	for {
		reg := op.registry()
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
					return fmt.Errorf("%w%s", err, where)
				}
			}
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d instances of plugin %q registered%s after %v, want %d%s", len(list), name, where, within, want, map[bool]string{true: " new ones"}[rs.New])
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
	token := r.c.Operator.Token
	if rs.Token != nil {
		token = *rs.Token
	}
	rc, stop, err := dialRaw(ctx, r.target(), creds, token, rs.ContentSubtype, r.logf)
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
	ops := r.rawOps
	if as.Replica != nil {
		if err := r.replicaIndex(*as.Replica); err != nil {
			return err
		}
		ops = ops[*as.Replica : *as.Replica+1]
	}
	rc, from, err := takeTunnel(ctx, ops, within)
	if err != nil {
		return err
	}
	if len(r.rawOps) > 1 {
		r.logf("raw operator %d: took the tunnel", from)
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

// takeTunnel takes the next tunnel the plugin opened to one of ops, and
// which of them.
func takeTunnel(ctx context.Context, ops []*rawOperator, within time.Duration) (*rawConn, int, error) {
	timer := time.NewTimer(within)
	defer timer.Stop()
	cases := []reflect.SelectCase{
		{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(timer.C)},
		{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())},
	}
	for _, op := range ops {
		cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(op.conns)})
	}
	i, v, _ := reflect.Select(cases)
	switch i {
	case 0:
		return nil, 0, fmt.Errorf("the plugin opened no tunnel within %v", within)
	case 1:
		return nil, 0, ctx.Err()
	}
	return v.Interface().(*rawConn), i - 2, nil
}

// noNewTunnel checks that no tunnel reaches the raw operators for d.
func (r *caseRun) noNewTunnel(ctx context.Context, d time.Duration) error {
	rc, from, err := takeTunnel(ctx, r.rawOps, d)
	if err == nil {
		r.raws = append(r.raws, rc)
		return fmt.Errorf("the plugin opened a tunnel to raw operator %d within %v, want none", from, d)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return nil
}

// maxBatchFrames is the most frames a batch may hold (spec 3.1).
const maxBatchFrames = 4096
