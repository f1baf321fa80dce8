package tunnel

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// Settings are the limits one side imposes on what it receives. Zero fields
// mean the protocol defaults; a zero HeartbeatInterval means "no preference".
type Settings struct {
	MaxMessageSize       int
	InitialWindowSize    int
	MaxConcurrentStreams int
	HeartbeatInterval    time.Duration
	MaxBatchSize         int
}

// Validate reports settings that no peer could honour.
func (s Settings) Validate() error {
	const maxInt32 = 1<<31 - 1
	switch {
	case s.MaxMessageSize < 0 || s.MaxMessageSize > maxInt32:
		return fmt.Errorf("max message size %d out of range", s.MaxMessageSize)
	case s.InitialWindowSize < 0 || s.InitialWindowSize > maxInt32 || (s.InitialWindowSize != 0 && s.InitialWindowSize < minWindow):
		return fmt.Errorf("initial window size %d out of range [%d, %d]", s.InitialWindowSize, minWindow, maxInt32)
	case s.MaxConcurrentStreams < 0 || s.MaxConcurrentStreams > maxInt32:
		return fmt.Errorf("max concurrent streams %d out of range", s.MaxConcurrentStreams)
	case s.HeartbeatInterval < 0:
		return fmt.Errorf("heartbeat interval %v is negative", s.HeartbeatInterval)
	case s.MaxBatchSize != 0 && (s.MaxBatchSize < MinMaxBatchSize || s.MaxBatchSize > maxInt32):
		return fmt.Errorf("max batch size %d out of range [%d, %d]", s.MaxBatchSize, MinMaxBatchSize, maxInt32)
	}
	return nil
}

// WithDefaults fills zero limits with the protocol defaults. The heartbeat
// interval stays as it is: zero there means "no preference".
func (s Settings) WithDefaults() Settings {
	if s.MaxMessageSize == 0 {
		s.MaxMessageSize = DefaultMaxMessageSize
	}
	if s.InitialWindowSize == 0 {
		s.InitialWindowSize = DefaultInitialWindowSize
	}
	if s.MaxConcurrentStreams == 0 {
		s.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	if s.MaxBatchSize == 0 {
		s.MaxBatchSize = DefaultMaxBatchSize
	}
	return s
}

func (s Settings) proto() *pb.Settings {
	p := &pb.Settings{
		MaxMessageSize:       uint32(s.MaxMessageSize),
		InitialWindowSize:    uint32(s.InitialWindowSize),
		MaxConcurrentStreams: uint32(s.MaxConcurrentStreams),
		MaxBatchSize:         uint32(s.MaxBatchSize),
	}
	if s.HeartbeatInterval > 0 {
		p.HeartbeatInterval = durationpb.New(s.HeartbeatInterval)
	}
	return p
}

func settingsFromProto(p *pb.Settings) (Settings, error) {
	s := Settings{
		MaxMessageSize:       int(p.GetMaxMessageSize()),
		InitialWindowSize:    int(p.GetInitialWindowSize()),
		MaxConcurrentStreams: int(p.GetMaxConcurrentStreams()),
		MaxBatchSize:         int(p.GetMaxBatchSize()),
	}
	if d := p.GetHeartbeatInterval(); d != nil {
		if err := d.CheckValid(); err != nil {
			return Settings{}, fmt.Errorf("heartbeat interval: %w", err)
		}
		s.HeartbeatInterval = d.AsDuration()
	}
	if err := s.Validate(); err != nil {
		return Settings{}, err
	}
	return s.WithDefaults(), nil
}

// heartbeatInterval is this side's interval (spec 11): the larger of the
// two preferences, so that neither side is made to ping faster than it
// wants, but no larger than this side's maximum (0: none), so that a peer
// cannot switch off dead-peer detection.
func heartbeatInterval(local, peer Settings, maxInterval time.Duration) time.Duration {
	d := max(local.HeartbeatInterval, peer.HeartbeatInterval)
	if d == 0 {
		d = DefaultHeartbeatInterval
	}
	d = max(d, MinHeartbeatInterval)
	if maxInterval > 0 {
		d = min(d, max(maxInterval, MinHeartbeatInterval))
	}
	return d
}

// negotiateVersion picks the highest version both ranges contain.
func negotiateVersion(h *pb.Hello) (uint32, bool) {
	v := min(h.GetMaxVersion(), MaxVersion)
	if v < max(h.GetMinVersion(), MinVersion) {
		return 0, false
	}
	return v, true
}
