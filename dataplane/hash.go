package dataplane

import (
	"bytes"
	"encoding/binary"
	"math/bits"
)

// Pick chooses the backend for a new client: weighted rendezvous hashing over
// the backends that AcceptsNew. Each backend is scored from a hash of the
// client key and of the backend's address (not its position or ID), and the
// backend with the lowest -log2(u)/weight wins, which selects a backend with
// probability weight/Σweights. Removing a backend moves only its own clients;
// adding one moves about weight/Σweights of the clients, all to it.
//
// The arithmetic is integer only (a fixed-point log2 and 128-bit cross
// multiplication), so every node, whatever its CPU, computes the same answer
// for the same inputs. Pick does not allocate. ok is false when no backend
// accepts new clients.
func Pick(backends []Backend, key ClientKey) (b Backend, ok bool) {
	i := pickIndex(backends, key)
	if i < 0 {
		return Backend{}, false
	}
	return backends[i], true
}

// pickIndex is Pick returning the index in backends, or -1.
func pickIndex(backends []Backend, key ClientKey) int {
	kh := keyHash(key)
	best := -1
	var bestScore, bestWeight uint64
	var bestAddr Addr
	for i := range backends {
		b := &backends[i]
		if !b.AcceptsNew() {
			continue
		}
		a := AddrFrom(b.Addr)
		score := negLog2(wymix(kh^0xa0761d6478bd642f, addrHash(a)^0xe7037ed1a0b428db))
		w := uint64(b.Weight)
		if best >= 0 {
			// score/w < bestScore/bestWeight  ⇔  score·bestWeight < bestScore·w
			lh, ll := bits.Mul64(score, bestWeight)
			rh, rl := bits.Mul64(bestScore, w)
			switch {
			case lh > rh || (lh == rh && ll > rl):
				continue
			case lh == rh && ll == rl && bytes.Compare(a[:], bestAddr[:]) >= 0:
				continue // exact tie: the lower address wins, on every node
			}
		}
		best, bestScore, bestWeight, bestAddr = i, score, w, a
	}
	return best
}

// The hashes below are fixed (unseeded) on purpose: every node must compute
// the same choice. They use the wyhash mixing step (a 64×64→128-bit multiply
// folded by xor), which is fast and mixes well enough for rendezvous scores.

func wymix(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	return hi ^ lo
}

func keyHash(k ClientKey) uint64 {
	h := wymix(binary.LittleEndian.Uint64(k.Client[0:8])^0x8ebc6af09c88c6e3,
		binary.LittleEndian.Uint64(k.Client[8:16])^0x589965cc75374cc3)
	return wymix(h^uint64(k.Service)^0x1d8e4e27c47d124f, 0xa0761d6478bd642f)
}

func addrHash(a Addr) uint64 {
	h := wymix(binary.LittleEndian.Uint64(a[0:8])^0x2d358dccaa6c78a5,
		binary.LittleEndian.Uint64(a[8:16])^0x8bb84b93962eacc9)
	return wymix(h^0x4b33a62ed433d4a3, 0x4d5a2da51de1aa47)
}

// negLog2 returns -log2(u) for u = x/2^64 in (0, 1), in fixed point with 32
// fractional bits. The result is at least 1 and at most 64<<32. The
// fraction is computed bit by bit by repeated squaring, in integers only.
func negLog2(x uint64) uint64 {
	x |= 1
	n := 63 - bits.LeadingZeros64(x) // integer part of log2(x)
	m := x << (63 - n)               // mantissa in [1, 2), Q1.63
	var frac uint64
	for i := 0; i < 32; i++ {
		hi, lo := bits.Mul64(m, m) // m² in Q2.126
		frac <<= 1
		if hi >= 1<<63 { // m² ≥ 2: emit a one bit and halve
			frac |= 1
			m = hi
		} else {
			m = hi<<1 | lo>>63
		}
	}
	log2x := uint64(n)<<32 | frac
	return 64<<32 - log2x
}
