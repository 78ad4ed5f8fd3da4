package dataplane

import "sync/atomic"

// swappable holds an interface value (an observer, a kernel path) that any
// goroutine may replace while the packet path reads it without a lock.
type swappable[T comparable] struct{ p atomic.Pointer[T] }

// Store replaces the value; the zero value (nil) removes it.
func (s *swappable[T]) Store(v T) {
	var zero T
	if v == zero {
		s.p.Store(nil)
		return
	}
	s.p.Store(&v)
}

// Load returns the value and whether there is one.
func (s *swappable[T]) Load() (T, bool) {
	if p := s.p.Load(); p != nil {
		return *p, true
	}
	var zero T
	return zero, false
}
