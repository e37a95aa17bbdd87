package fanout

// replayAfter returns the events a subscriber that saw lastEventID last has
// missed, and whether the ring can tell.
func (s *stream) replayAfter(lastEventID string) ([]*event, bool) {
	if lastEventID == "" || lastEventID == s.lastID {
		return nil, true
	}
	for i := s.ringLen - 1; i >= 0; i-- {
		if ev := s.ringAt(i); ev.hasID && ev.id == lastEventID {
			return s.ringFrom(i + 1), true
		}
	}
	if lastEventID == s.base && s.whole {
		return s.ringFrom(0), true
	}
	return nil, false
}

func (s *stream) ringAt(i int) *event { return s.ring[(s.ringHead+i)%len(s.ring)] }

func (s *stream) ringFrom(i int) []*event {
	out := make([]*event, 0, s.ringLen-i)
	for ; i < s.ringLen; i++ {
		out = append(out, s.ringAt(i))
	}
	return out
}

func (s *stream) push(ev *event) {
	n := s.hub.cfg.Replay
	if n <= 0 {
		s.whole = false
		return
	}
	if s.ring == nil {
		s.ring = make([]*event, n)
	}
	if s.ringLen < n {
		s.ring[(s.ringHead+s.ringLen)%n] = ev
		s.ringLen++
		return
	}
	s.ring[s.ringHead] = ev
	s.ringHead = (s.ringHead + 1) % n
	s.whole = false
}
