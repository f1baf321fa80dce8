package conformance

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// The cases, one YAML file per topic; docs/conformance.md describes the
// format.
//
//go:embed cases/*.yaml
var caseFiles embed.FS

// Case is one conformance case: a name, what it checks, the operator and
// plugins it needs, and the steps that drive them.
type Case struct {
	Name string `yaml:"name"`
	// Checks says what the case checks, in a sentence or two; it is
	// printed when the case fails.
	Checks   string       `yaml:"checks"`
	Operator OperatorSpec `yaml:"operator"`
	Plugin   PluginSpec   `yaml:"plugin"`
	// Timeout bounds the whole case. Default 60 s.
	Timeout Duration `yaml:"timeout"`
	// Exclusive runs the case alone, not beside others (--parallel): it
	// moves much data or checks tight timings.
	Exclusive bool   `yaml:"exclusive"`
	Steps     []Step `yaml:"steps"`

	file string
}

// OperatorSpec is the operator a case runs against.
type OperatorSpec struct {
	// Kind is "server" (default), the framework's Go server, which calls
	// the plugins through its registry; or "raw", the runner's own gRPC
	// server speaking raw frames (the accept step takes a plugin's tunnel).
	Kind string `yaml:"kind"`
	// Limits the operator imposes (server) or advertises in its Hello
	// (raw); 0 means the protocol default.
	MaxMessageSize    Size     `yaml:"max_message_size"`
	InitialWindowSize Size     `yaml:"initial_window_size"`
	HeartbeatInterval Duration `yaml:"heartbeat_interval"`
	// Server only.
	DrainTimeout     Duration `yaml:"drain_timeout"`
	HandshakeTimeout Duration `yaml:"handshake_timeout"`
	// Reject refuses registrations (server only).
	Reject *RejectSpec `yaml:"reject"`
	// Token makes the server require "authorization: Bearer TOKEN" and
	// hands TOKEN to the plugin (OPF_CONFORMANCE_TOKEN).
	Token string `yaml:"token"`
	// TLS makes the server serve TLS with a certificate of a throw-away CA,
	// handed to the plugin (OPF_CONFORMANCE_TLS_CA, _SERVER_NAME).
	TLS bool `yaml:"tls"`
	// ReplicaID and ReplicaCount are the server's WithReplica (its Hello's
	// replica_id and replica_count); an empty id keeps the server's
	// default.
	ReplicaID    string `yaml:"replica_id"`
	ReplicaCount int    `yaml:"replica_count"`
	// Replicas runs that many operators (servers, or raw operators), each
	// on its own loopback address and all on one port, with replica ids
	// replica-0, replica-1, ... (server); the plugin's target lists every
	// address (ipv4:127.0.0.2:P,127.0.0.3:P,...), plaintext. Default 1: one
	// operator on a unix socket, unless Aliases or Balanced ask for TCP.
	Replicas int `yaml:"replicas"`
	// Aliases adds to the target one address per entry that forwards to
	// the replica of that index (the same replica reached twice).
	Aliases []int `yaml:"aliases"`
	// Balanced makes the target a single address, a round-robin TCP
	// forwarder in front of the replicas (a load-balanced Service).
	Balanced bool `yaml:"balanced"`
	// ListedTwice adds the address of the replica of each index to the
	// target a second time (plugins deduplicate their address lists).
	ListedTwice []int `yaml:"listed_twice"`
}

// tcp reports whether the operators listen on loopback TCP addresses.
func (o OperatorSpec) tcp() bool {
	return o.Replicas > 1 || len(o.Aliases) > 0 || o.Balanced || len(o.ListedTwice) > 0
}

func (o OperatorSpec) replicas() int { return max(o.Replicas, 1) }

// RejectSpec refuses registrations with a status.
type RejectSpec struct {
	// Count is how many registrations are refused before the others are
	// accepted; 0 refuses them all.
	Count   int    `yaml:"count"`
	Code    string `yaml:"code"`
	Message string `yaml:"message"`
	// MessageSize makes the message that many letters long instead.
	MessageSize Size `yaml:"message_size"`
}

// PluginSpec is how the plugin under test is started.
type PluginSpec struct {
	// Instances is how many plugin processes start before the steps
	// (default 1). 0 starts none: the case tests the operator, with the
	// runner playing a raw plugin.
	Instances *int `yaml:"instances"`
	// Name the plugin registers under (default "conformance").
	Name string `yaml:"name"`
	// MaxMessageSize is handed over in OPF_CONFORMANCE_MAX_MESSAGE_SIZE.
	MaxMessageSize Size `yaml:"max_message_size"`
	// DrainTimeout is handed over in OPF_CONFORMANCE_DRAIN_TIMEOUT_MS
	// (default 2 s).
	DrainTimeout Duration `yaml:"drain_timeout"`
	// Wait for the registration before the steps (default true, only
	// with the server operator).
	WaitRegistered *bool `yaml:"wait_registered"`
}

func (c *Case) instances() int {
	if c.Plugin.Instances == nil {
		return 1
	}
	return *c.Plugin.Instances
}

// TestsOperator reports whether the case tests the operator (the
// framework's Go server) rather than the plugin under test: it starts no
// plugin.
func (c *Case) TestsOperator() bool { return c.instances() == 0 }

func (c *Case) pluginName() string {
	if c.Plugin.Name != "" {
		return c.Plugin.Name
	}
	return "conformance"
}

// Step is one action of a case; exactly one field is set.
type Step struct {
	// Calls through the server operator's registry.
	Call *CallStep `yaml:"call"`
	// Integrity makes many calls of random sizes and contents and checks
	// every byte (integrity.go), through the server's registry or, with
	// the raw operator, the runner's own caller (rawcall.go).
	Integrity  *IntegrityStep `yaml:"integrity"`
	WaitCall   string         `yaml:"wait_call"`   // wait for a background call and check it
	CancelCall string         `yaml:"cancel_call"` // cancel a background call

	// The plugins and the operator.
	Registered      *RegisteredStep    `yaml:"registered"`
	StartPlugin     *struct{}          `yaml:"start_plugin"`
	StopPlugin      *StopStep          `yaml:"stop_plugin"`
	RestartOperator *RestartStep       `yaml:"restart_operator"`
	WaitRestart     bool               `yaml:"wait_restart"`
	Rejections      *int               `yaml:"rejections"` // registrations the server refused so far
	Registrations   *RegistrationsStep `yaml:"registrations"`
	Forwarder       *ForwarderStep     `yaml:"forwarder"`
	Accepted        *AcceptedStep      `yaml:"accepted"`
	Sleep           Duration           `yaml:"sleep"`

	// Raw frames: raw_connect (the runner as a plugin, against the server)
	// or accept (the runner as the operator, taking the plugin's tunnel)
	// open the raw tunnel the other steps use.
	RawConnect    *RawConnectStep `yaml:"raw_connect"`
	Accept        *AcceptStep     `yaml:"accept"`
	Send          []FrameSpec     `yaml:"send"`
	SendBytes     string          `yaml:"send_bytes"`
	Await         *FrameMatch     `yaml:"await"`
	ExpectSilence *SilenceStep    `yaml:"expect_silence"`
	ExpectEnd     *EndStep        `yaml:"expect_end"`
	CloseRaw      *CloseRawStep   `yaml:"close_raw"`
	// MaxBatch checks that no batch received on the raw tunnel so far was
	// larger than this many bytes (encoded ConnectRequest or
	// ConnectResponse).
	MaxBatch Size `yaml:"max_batch"`
	// OpensInOrder takes the StreamOpen frames received on the raw tunnel
	// and checks that their ids have the peer's parity and increase, with
	// at least Min of them.
	OpensInOrder *struct {
		Min         int  `yaml:"min"`
		Consecutive bool `yaml:"consecutive"`
	} `yaml:"opens_in_order"`
	// ConnectCall matches the plugin's Connect call at the raw operator:
	// whether it has a deadline, and its metadata ({key: [values]}, [] for
	// absent).
	ConnectCall *ConnectCallStep `yaml:"connect_call"`
	// OneBatch checks that every frame received so far on that stream
	// came in one batch.
	OneBatch int `yaml:"one_batch"`
	// NoNewTunnel checks that the plugin opens no tunnel to the raw
	// operators for this long.
	NoNewTunnel Duration `yaml:"no_new_tunnel"`
	// UseRaw makes the frame steps use an earlier raw tunnel: 1 is the
	// first that raw_connect or accept opened.
	UseRaw int `yaml:"use_raw"`
	// MaxFrames checks that no batch received so far held more frames.
	MaxFrames int `yaml:"max_frames"`
	// Flood sends Frames copies of Frame, their stream ids stepping by 2,
	// in batches of 4,096, and stops quietly if the tunnel ends first.
	Flood *FloodStep `yaml:"flood"`
	// PauseReading stops reading the raw tunnel for this long (the step
	// returns at once), so that the peer's frames pile up in its queues.
	PauseReading Duration `yaml:"pause_reading"`
	// Credit checks the peer's chunks on a stream against the credit the
	// runner granted (spec 8.1).
	Credit *CreditStep `yaml:"credit"`
	// FrameCounts matches how many frames of each kind were received on
	// the raw tunnel since it opened ({register: 0}), consumed or not.
	FrameCounts map[string]any `yaml:"frame_counts"`
	// AwaitMessage reassembles the next message the peer sends on a
	// stream from its chunks, checking the chunk rules of spec 7.2.
	AwaitMessage *AwaitMessageStep `yaml:"await_message"`
}

// CallStep calls the plugin through the server operator's registry.
type CallStep struct {
	// Method is Unary, ServerStream, ClientStream, BidiStream or
	// GetObservation, or a full "/package.Service/Method" name called as
	// a unary call with UnaryRequest and UnaryResponse.
	Method string `yaml:"method"`
	// Plugin is the plugin's name (default: the case's).
	Plugin string `yaml:"plugin"`
	// Metadata is sent with the call; values of "-bin" keys are base64.
	Metadata map[string][]string `yaml:"metadata"`
	// Timeout gives the call a deadline; none by default.
	Timeout Duration `yaml:"timeout"`
	// CancelAfter cancels the call after this long.
	CancelAfter Duration `yaml:"cancel_after"`
	// Request (unary and server streaming) or Requests (client streaming
	// and bidi, sent in order; in bidi, after each request the runner reads
	// the responses its action asks for) in protobuf JSON, snake_case, with
	// the sugar documented in docs/conformance.md.
	Request  map[string]any   `yaml:"request"`
	Requests []map[string]any `yaml:"requests"`
	// Parallel makes this many identical calls at once.
	Parallel int `yaml:"parallel"`
	// ID names a background call (see wait_call and cancel_call).
	ID string `yaml:"id"`
	// Background starts the call and goes on; wait_call checks it.
	Background bool `yaml:"background"`
	// Hold starts the call and sends its requests but reads nothing (a
	// stalled consumer); it runs in the background.
	Hold bool `yaml:"hold"`
	// RepeatFor makes the call again and again for this long (Parallel
	// calls at a time), each checked: a load that must not fail.
	RepeatFor Duration `yaml:"repeat_for"`
	// Replica is the operator whose registry makes the call (default 0).
	Replica int         `yaml:"replica"`
	Expect  Expectation `yaml:"expect"`
}

// Expectation is what a call must end with.
type Expectation struct {
	// Code is the status code name (default OK).
	Code            string  `yaml:"code"`
	Message         *string `yaml:"message"`
	MessageContains string  `yaml:"message_contains"`
	// Details are matched, in order, against the status details.
	Details []any `yaml:"details"`
	// Headers and Trailers: each key listed must have exactly these values
	// (an empty list: the key must be absent). "-bin" values are base64.
	Headers  map[string][]string `yaml:"headers"`
	Trailers map[string][]string `yaml:"trailers"`
	// Response is matched against the only response (unary and client
	// streaming) or the last one.
	Response any `yaml:"response"`
	// Responses are matched one by one; their count must match.
	Responses     []any `yaml:"responses"`
	ResponseCount *int  `yaml:"response_count"`
	// MaxDuration and MinDuration bound how long the call took.
	MaxDuration Duration `yaml:"max_duration"`
	MinDuration Duration `yaml:"min_duration"`
	// DistinctProcesses is the least number of distinct plugin processes
	// (observation.process_id) that answered a parallel call.
	DistinctProcesses int `yaml:"distinct_processes"`
}

// RegisteredStep waits until the server's registry lists Count instances
// of the plugin, and checks them.
type RegisteredStep struct {
	Count  *int     `yaml:"count"` // default 1
	Within Duration `yaml:"within"`
	// Instance is matched against each instance: name, version,
	// services, labels.
	Instance any `yaml:"instance"`
	// New waits for instances registered after this step started.
	New bool `yaml:"new"`
	// Replica checks that operator's registry only; by default every
	// replica's must list Count instances.
	Replica *int `yaml:"replica"`
}

// RegistrationsStep checks how many Register frames a replica's server
// has seen (accepted or refused), since it started.
type RegistrationsStep struct {
	Replica int `yaml:"replica"`
	Count   any `yaml:"count"`
}

// AcceptedStep checks how many connections a replica's server has
// accepted since it started (of every start, restarts included).
type AcceptedStep struct {
	Replica     int `yaml:"replica"`
	Connections any `yaml:"connections"`
}

// ForwarderStep checks how many connections an alias or the balancer (in
// the order of OperatorSpec: the aliases, then the balancer) has
// relayed.
type ForwarderStep struct {
	Index       int `yaml:"index"`
	Connections any `yaml:"connections"`
}

// StopStep sends SIGTERM to a plugin process and waits for it.
type StopStep struct {
	Index int `yaml:"index"`
	// Within is how long the plugin may take to exit (default: the grace
	// period).
	Within Duration `yaml:"within"`
	// Background sends the signal and goes on; the exit is still checked at
	// the end of the case.
	Background bool `yaml:"background"`
}

// RestartStep stops the server operator and starts a new one on the same
// socket.
type RestartStep struct {
	// Mode is "graceful" (the server drains: GoAway, calls finish) or
	// "crash" (every connection is cut at once).
	Mode    string   `yaml:"mode"`
	DownFor Duration `yaml:"down_for"`
	// Background restarts while the next steps run (graceful only);
	// wait_restart waits for it.
	Background bool `yaml:"background"`
	// Replica is the operator restarted (default 0); a restarted replica
	// is a new process with a new replica id.
	Replica int `yaml:"replica"`
}

// RawConnectStep opens a tunnel to the server operator as a raw plugin.
type RawConnectStep struct {
	// Hello and Register are sent (and the operator's Hello and
	// RegisterAck awaited) unless false.
	Hello    *bool    `yaml:"hello"`
	Register *bool    `yaml:"register"`
	Name     string   `yaml:"name"`
	Services []string `yaml:"services"`
	// Settings are the raw plugin's Hello settings (protobuf JSON).
	Settings map[string]any `yaml:"settings"`
	// AnswerPings answers the operator's pings (default true).
	AnswerPings *bool `yaml:"answer_pings"`
	// Token replaces the case's token ("" sends none).
	Token *string `yaml:"token"`
	// ContentSubtype makes the Connect call's content-type
	// application/grpc+SUBTYPE.
	ContentSubtype string `yaml:"content_subtype"`
}

// AcceptStep takes the next tunnel the plugin opens to the raw operator.
type AcceptStep struct {
	Within Duration `yaml:"within"`
	// Handshake awaits the plugin's Hello as its first frame, answers with
	// the operator's Hello, awaits the plugin's Register as its next frame,
	// and answers with a RegisterAck unless Ack is false. Default true.
	Handshake *bool `yaml:"handshake"`
	Ack       *bool `yaml:"ack"`
	// Replica takes the tunnel from that raw operator (replicas); by
	// default from any.
	Replica *int `yaml:"replica"`
	// Register is matched against the plugin's Register frame; false: the
	// handshake stops after the operator's Hello (a Hello the plugin must
	// refuse).
	Register any `yaml:"register"`
	// Hello overrides the operator's Hello (protobuf JSON); default: version
	// 2, the operator's settings.
	Hello       map[string]any `yaml:"hello"`
	AnswerPings *bool          `yaml:"answer_pings"`
}

// FrameSpec is one frame to send: "stream" and one frame kind, named as in
// tunnel.proto's Frame oneof (docs/conformance.md).
type FrameSpec map[string]any

// FrameMatch is a frame to wait for: "stream", "within" and one frame kind
// whose value is matched against the received frame of that kind.
type FrameMatch map[string]any

// yaml.v3 decodes the maps nested in a named map type with that type:
// decode plain maps instead.

func (f *FrameSpec) UnmarshalYAML(n *yaml.Node) error {
	var m map[string]any
	err := n.Decode(&m)
	*f = m
	return err
}

func (f *FrameMatch) UnmarshalYAML(n *yaml.Node) error {
	var m map[string]any
	err := n.Decode(&m)
	*f = m
	return err
}

// CreditStep checks that the peer never sent a chunk on Stream costing more
// than the credit left (data + 64 per chunk, against the runner's Hello
// window plus its WindowUpdates), and matches what was spent: Spent (the
// chunks' cost), Chunks (their number) and Left (the credit left), each
// a value or a $ operator.
type CreditStep struct {
	Stream int `yaml:"stream"`
	Spent  any `yaml:"spent"`
	Chunks any `yaml:"chunks"`
	Left   any `yaml:"left"`
}

// AwaitMessageStep waits (Within, default 3 s) for the chunks of the next
// message on Stream, removes them from the queue, and matches the message:
// Size (its length), Chunks (their number), and with Decode the decoded
// message against Value.
type AwaitMessageStep struct {
	Stream int      `yaml:"stream"`
	Within Duration `yaml:"within"`
	Size   any      `yaml:"size"`
	Chunks any      `yaml:"chunks"`
	Decode string   `yaml:"decode"`
	Value  any      `yaml:"value"`
}

// SilenceStep checks that no frame of these kinds arrives for a while.
type SilenceStep struct {
	For   Duration `yaml:"for"`
	Kinds []string `yaml:"kinds"`
	// Stream limits the check to that stream's frames (0: all).
	Stream uint64 `yaml:"stream"`
}

// EndStep waits for the raw tunnel's Connect stream to end.
type EndStep struct {
	Within Duration `yaml:"within"`
	// Code is the status the raw plugin's stream ended with (raw_connect
	// only); empty accepts any end.
	Code            string `yaml:"code"`
	MessageContains string `yaml:"message_contains"`
}

// CloseRawStep ends the raw tunnel from the runner's side: the raw
// operator ends the Connect call with the status, the raw plugin
// half-closes and cancels it (or only half-closes, with HalfClose).
type CloseRawStep struct {
	Code      string `yaml:"code"`
	Message   string `yaml:"message"`
	HalfClose bool   `yaml:"half_close"`
}

// FloodStep is a flood of frames (see Step.Flood).
type FloodStep struct {
	Frame  FrameSpec `yaml:"frame"`
	Frames int       `yaml:"frames"`
}

// ConnectCallStep is what the plugin's Connect call must carry.
type ConnectCallStep struct {
	Deadline *bool               `yaml:"deadline"`
	Metadata map[string][]string `yaml:"metadata"`
}

// Duration is a time.Duration written as in Go ("300ms").
type Duration time.Duration

func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*d = Duration(v)
	return nil
}

// D returns the duration, or def when unset.
func (d Duration) D(def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return time.Duration(d)
}

// Size is a byte count: an integer, or with a KiB or MiB suffix ("8MiB").
type Size int

func (s *Size) UnmarshalYAML(n *yaml.Node) error {
	v, err := parseSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*s = Size(v)
	return nil
}

func parseSize(s string) (int, error) {
	s = strings.TrimSpace(s)
	orig := s
	// "8MiB+1"
	plus := 0
	if i := strings.LastIndexAny(s, "+-"); i > 0 {
		p, err := strconv.Atoi(strings.TrimSpace(s[i:]))
		if err != nil {
			return 0, fmt.Errorf("bad size %q", orig)
		}
		s, plus = strings.TrimSpace(s[:i]), p
	}
	mult := 1
	for suffix, m := range map[string]int{"KiB": 1 << 10, "MiB": 1 << 20} {
		if rest, ok := strings.CutSuffix(s, suffix); ok {
			s, mult = rest, m
		}
	}
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("bad size %q: want an integer, optionally with KiB or MiB and +N or -N", orig)
	}
	return n*mult + plus, nil
}

// LoadCases reads the embedded cases, checks them, and returns them sorted
// by name.
func LoadCases() ([]*Case, error) {
	var all []*Case
	err := fs.WalkDir(caseFiles, "cases", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || path.Ext(p) != ".yaml" {
			return err
		}
		data, err := caseFiles.ReadFile(p)
		if err != nil {
			return err
		}
		cs, err := parseCases(p, data)
		if err != nil {
			return err
		}
		all = append(all, cs...)
		return nil
	})
	if err != nil {
		return nil, err
	}
	seen := map[string]string{}
	for _, c := range all {
		if f, dup := seen[c.Name]; dup {
			return nil, fmt.Errorf("case %q defined twice (%s and %s)", c.Name, f, c.file)
		}
		seen[c.Name] = c.file
	}
	slices.SortFunc(all, func(a, b *Case) int { return strings.Compare(a.Name, b.Name) })
	return all, nil
}

var caseName = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*(/[a-z0-9][a-z0-9-]*)+$`)

func parseCases(file string, data []byte) ([]*Case, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var cs []*Case
	if err := dec.Decode(&cs); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	for _, c := range cs {
		c.file = file
		if err := c.validate(); err != nil {
			return nil, fmt.Errorf("%s: case %q: %w", file, c.Name, err)
		}
	}
	return cs, nil
}

func (c *Case) validate() error {
	if !caseName.MatchString(c.Name) {
		return errors.New("name must be lower-case words separated by '/', like unary/echo")
	}
	if strings.TrimSpace(c.Checks) == "" {
		return errors.New("checks is empty: say what the case checks")
	}
	if len(c.Steps) == 0 {
		return errors.New("no steps")
	}
	switch c.Operator.Kind {
	case "", "server", "raw":
	default:
		return fmt.Errorf("operator kind %q: want server or raw", c.Operator.Kind)
	}
	if c.Operator.Kind == "raw" && (c.Operator.Reject != nil || c.Operator.TLS) {
		return errors.New("reject and tls need the server operator")
	}
	if c.Operator.tcp() && (c.Operator.Token != "" || c.Operator.TLS) {
		return errors.New("replicas, aliases and balanced are plaintext without a token")
	}
	for i, s := range c.Steps {
		if err := s.validate(c); err != nil {
			return fmt.Errorf("step %d: %w", i+1, err)
		}
	}
	return nil
}

// kind names the step's one set field.
func (s *Step) kind() (string, error) {
	v := reflect.ValueOf(s).Elem()
	var set []string
	for i := range v.NumField() {
		if !v.Field(i).IsZero() {
			set = append(set, strings.Split(v.Type().Field(i).Tag.Get("yaml"), ",")[0])
		}
	}
	if len(set) != 1 {
		return "", fmt.Errorf("a step has exactly one action, found %v", set)
	}
	return set[0], nil
}

func (s *Step) validate(c *Case) error {
	k, err := s.kind()
	if err != nil {
		return err
	}
	raw := c.Operator.Kind == "raw"
	switch k {
	case "call", "wait_call", "cancel_call", "registered", "restart_operator", "wait_restart", "rejections", "registrations", "accepted", "raw_connect":
		if raw {
			return fmt.Errorf("%s needs the server operator", k)
		}
	case "accept", "no_new_tunnel":
		if !raw {
			return fmt.Errorf("%s needs the raw operator", k)
		}
	}
	switch {
	case s.Call != nil:
		return s.Call.validate()
	case s.Integrity != nil:
		return s.Integrity.validate()
	case s.Send != nil:
		for _, f := range s.Send {
			if _, err := frameKind(map[string]any(f), frameSpecKeys...); err != nil {
				return err
			}
		}
	case s.Await != nil:
		if _, err := frameKind(map[string]any(*s.Await), matchKeys...); err != nil {
			return err
		}
	case s.RestartOperator != nil:
		switch s.RestartOperator.Mode {
		case "graceful":
		case "crash":
			if s.RestartOperator.Background {
				return errors.New("only a graceful restart runs in the background")
			}
		default:
			return fmt.Errorf("restart mode %q: want graceful or crash", s.RestartOperator.Mode)
		}
	}
	return nil
}

var callMethods = []string{"Unary", "ServerStream", "ClientStream", "BidiStream", "GetObservation"}

func (cs *CallStep) validate() error {
	if !slices.Contains(callMethods, cs.Method) && !strings.HasPrefix(cs.Method, "/") {
		return fmt.Errorf("method %q: want one of %v or a full method name", cs.Method, callMethods)
	}
	if (cs.Background || cs.Hold) && cs.ID == "" {
		return errors.New("a background call needs an id")
	}
	if cs.Hold && !slices.Contains([]string{"ServerStream", "ClientStream", "BidiStream"}, cs.Method) {
		return errors.New("only streaming calls can be held")
	}
	if cs.Parallel > 0 && cs.Hold || cs.Parallel > 0 && cs.Background && cs.RepeatFor == 0 {
		return errors.New("parallel calls run in the background only with repeat_for")
	}
	if _, err := codeByName(cs.Expect.Code); err != nil {
		return err
	}
	return nil
}

// frameKind returns the one frame kind key of m, besides the allowed extra
// keys.
func frameKind(m map[string]any, extra ...string) (string, error) {
	var kinds []string
	for k := range m {
		if slices.Contains(extra, k) {
			continue
		}
		if _, ok := frameKinds[k]; !ok && k != "unknown" {
			return "", fmt.Errorf("unknown frame key %q", k)
		}
		kinds = append(kinds, k)
	}
	if len(kinds) != 1 {
		return "", fmt.Errorf("a frame has exactly one kind, found %v", kinds)
	}
	return kinds[0], nil
}
