//go:build !linux

package hostnet

func (m *Manager) applyNFT(Spec, bool, bool) error { return ErrUnsupported }
func (m *Manager) applyRouting(bool, bool) error   { return ErrUnsupported }
func (m *Manager) removeNFT() error                { return nil }
func (m *Manager) removeRouting() error            { return nil }
