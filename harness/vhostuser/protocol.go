package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Request is a vhost-user front-end request code.
type Request uint32

// Front-end request codes (docs/interop/vhost-user.rst).
const (
	GetFeatures         Request = 1
	SetFeatures         Request = 2
	SetOwner            Request = 3
	ResetOwner          Request = 4
	SetMemTable         Request = 5
	SetLogBase          Request = 6
	SetLogFD            Request = 7
	SetVringNum         Request = 8
	SetVringAddr        Request = 9
	SetVringBase        Request = 10
	GetVringBase        Request = 11
	SetVringKick        Request = 12
	SetVringCall        Request = 13
	SetVringErr         Request = 14
	GetProtocolFeatures Request = 15
	SetProtocolFeatures Request = 16
	GetQueueNum         Request = 17
	SetVringEnable      Request = 18
	SendRARP            Request = 19
	NetSetMTU           Request = 20
	SetBackendReqFD     Request = 21
	IOTLBMsg            Request = 22
	SetVringEndian      Request = 23
	GetConfig           Request = 24
	SetConfig           Request = 25
	ResetDevice         Request = 34
	GetMaxMemSlots      Request = 36
	AddMemReg           Request = 37
	RemMemReg           Request = 38
)

var requestNames = map[Request]string{
	GetFeatures: "GET_FEATURES", SetFeatures: "SET_FEATURES", SetOwner: "SET_OWNER",
	ResetOwner: "RESET_OWNER", SetMemTable: "SET_MEM_TABLE", SetLogBase: "SET_LOG_BASE",
	SetLogFD: "SET_LOG_FD", SetVringNum: "SET_VRING_NUM", SetVringAddr: "SET_VRING_ADDR",
	SetVringBase: "SET_VRING_BASE", GetVringBase: "GET_VRING_BASE", SetVringKick: "SET_VRING_KICK",
	SetVringCall: "SET_VRING_CALL", SetVringErr: "SET_VRING_ERR",
	GetProtocolFeatures: "GET_PROTOCOL_FEATURES", SetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	GetQueueNum: "GET_QUEUE_NUM", SetVringEnable: "SET_VRING_ENABLE", SendRARP: "SEND_RARP",
	NetSetMTU: "NET_SET_MTU", SetBackendReqFD: "SET_BACKEND_REQ_FD", IOTLBMsg: "IOTLB_MSG",
	SetVringEndian: "SET_VRING_ENDIAN", GetConfig: "GET_CONFIG", SetConfig: "SET_CONFIG",
	ResetDevice: "RESET_DEVICE", GetMaxMemSlots: "GET_MAX_MEM_SLOTS", AddMemReg: "ADD_MEM_REG",
	RemMemReg: "REM_MEM_REG",
}

func (r Request) String() string {
	if n, ok := requestNames[r]; ok {
		return n
	}
	return fmt.Sprintf("REQUEST_%d", uint32(r))
}

// Header flags.
const (
	FlagVersion     = 0x1 // the only protocol version, in bits 0-1
	FlagReply       = 0x4
	FlagNeedReply   = 0x8
	flagVersionMask = 0x3
)

// Feature bits.
const (
	// FeatureProtocolFeatures is VHOST_USER_F_PROTOCOL_FEATURES, a virtio
	// feature bit borrowed by vhost-user.
	FeatureProtocolFeatures = 30

	ProtocolFeatureMQ          = 0
	ProtocolFeatureReplyAck    = 3
	ProtocolFeatureConfig      = 9
	ProtocolFeatureResetDevice = 13
)

// offeredProtocolFeatures are the protocol features this back-end
// implements: acknowledged requests, the config space and RESET_DEVICE.
const offeredProtocolFeatures = 1<<ProtocolFeatureReplyAck | 1<<ProtocolFeatureConfig | 1<<ProtocolFeatureResetDevice

// Wire sizes and limits.
const (
	HeaderSize = 12
	// MaxPayload bounds a message body; the largest body a front-end sends
	// to this back-end is a GET/SET_CONFIG (12 + 256 bytes) or an 8-region
	// memory table (8 + 8*32 bytes).
	MaxPayload = 4096
	// MaxFDs is the most fds a message may carry (an 8-region memory table).
	MaxFDs = 8
	// MaxMemRegions is the memory table limit without CONFIGURE_MEM_SLOTS.
	MaxMemRegions = 8

	memRegionSize    = 32
	vringStateSize   = 8
	vringAddrSize    = 40
	configHeaderSize = 12
	// maxConfigSize is VHOST_USER_MAX_CONFIG_SIZE.
	maxConfigSize = 256

	// vringIndexMask and vringNoFDMask decode the u64 of SET_VRING_KICK/CALL/ERR.
	vringIndexMask = 0xff
	vringNoFDMask  = 0x100
)

// Header is a vhost-user message header.
type Header struct {
	Request Request
	Flags   uint32
	Size    uint32
}

// ErrProtocol is wrapped by errors for messages that break the protocol.
var ErrProtocol = errors.New("vhost-user protocol error")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// ParseHeader decodes and validates a message header from the front-end.
func ParseHeader(b []byte) (Header, error) {
	if len(b) != HeaderSize {
		return Header{}, protoErr("header is %d bytes, want %d", len(b), HeaderSize)
	}
	h := Header{
		Request: Request(binary.LittleEndian.Uint32(b[0:])),
		Flags:   binary.LittleEndian.Uint32(b[4:]),
		Size:    binary.LittleEndian.Uint32(b[8:]),
	}
	if h.Flags&flagVersionMask != FlagVersion {
		return h, protoErr("%v: unsupported version %d", h.Request, h.Flags&flagVersionMask)
	}
	if h.Flags&FlagReply != 0 {
		return h, protoErr("%v: front-end sent a reply", h.Request)
	}
	if h.Size > MaxPayload {
		return h, protoErr("%v: payload of %d bytes exceeds %d", h.Request, h.Size, MaxPayload)
	}
	return h, nil
}

// AppendHeader appends the wire form of h.
func AppendHeader(b []byte, h Header) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(h.Request))
	b = binary.LittleEndian.AppendUint32(b, h.Flags)
	return binary.LittleEndian.AppendUint32(b, h.Size)
}

// MemRegion is one entry of a SET_MEM_TABLE payload.
type MemRegion struct {
	GuestAddr  uint64
	Size       uint64
	UserAddr   uint64
	MmapOffset uint64
}

// ParseMemTable decodes a SET_MEM_TABLE payload.
func ParseMemTable(p []byte) ([]MemRegion, error) {
	if len(p) < 8 {
		return nil, protoErr("SET_MEM_TABLE payload of %d bytes", len(p))
	}
	n := binary.LittleEndian.Uint32(p)
	if n == 0 || n > MaxMemRegions {
		return nil, protoErr("SET_MEM_TABLE with %d regions (want 1..%d)", n, MaxMemRegions)
	}
	// QEMU sends exactly n entries; tolerate the full fixed-size array too.
	if len(p) != 8+int(n)*memRegionSize && len(p) != 8+MaxMemRegions*memRegionSize {
		return nil, protoErr("SET_MEM_TABLE payload of %d bytes for %d regions", len(p), n)
	}
	regions := make([]MemRegion, n)
	for i := range regions {
		e := p[8+i*memRegionSize:]
		regions[i] = MemRegion{
			GuestAddr:  binary.LittleEndian.Uint64(e[0:]),
			Size:       binary.LittleEndian.Uint64(e[8:]),
			UserAddr:   binary.LittleEndian.Uint64(e[16:]),
			MmapOffset: binary.LittleEndian.Uint64(e[24:]),
		}
	}
	return regions, nil
}

// AppendMemTable appends a SET_MEM_TABLE payload.
func AppendMemTable(b []byte, regions []MemRegion) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(len(regions)))
	b = binary.LittleEndian.AppendUint32(b, 0)
	for _, r := range regions {
		b = binary.LittleEndian.AppendUint64(b, r.GuestAddr)
		b = binary.LittleEndian.AppendUint64(b, r.Size)
		b = binary.LittleEndian.AppendUint64(b, r.UserAddr)
		b = binary.LittleEndian.AppendUint64(b, r.MmapOffset)
	}
	return b
}

// VringAddr is a SET_VRING_ADDR payload.
type VringAddr struct {
	Index                  uint32
	Flags                  uint32
	Desc, Used, Avail, Log uint64
}

func parseVringAddr(p []byte) (VringAddr, error) {
	if len(p) != vringAddrSize {
		return VringAddr{}, protoErr("SET_VRING_ADDR payload of %d bytes, want %d", len(p), vringAddrSize)
	}
	return VringAddr{
		Index: binary.LittleEndian.Uint32(p[0:]),
		Flags: binary.LittleEndian.Uint32(p[4:]),
		Desc:  binary.LittleEndian.Uint64(p[8:]),
		Used:  binary.LittleEndian.Uint64(p[16:]),
		Avail: binary.LittleEndian.Uint64(p[24:]),
		Log:   binary.LittleEndian.Uint64(p[32:]),
	}, nil
}

// AppendVringAddr appends a SET_VRING_ADDR payload.
func AppendVringAddr(b []byte, a VringAddr) []byte {
	b = binary.LittleEndian.AppendUint32(b, a.Index)
	b = binary.LittleEndian.AppendUint32(b, a.Flags)
	b = binary.LittleEndian.AppendUint64(b, a.Desc)
	b = binary.LittleEndian.AppendUint64(b, a.Used)
	b = binary.LittleEndian.AppendUint64(b, a.Avail)
	return binary.LittleEndian.AppendUint64(b, a.Log)
}

// AppendVringState appends a vring state payload (index, num).
func AppendVringState(b []byte, index, num uint32) []byte {
	b = binary.LittleEndian.AppendUint32(b, index)
	return binary.LittleEndian.AppendUint32(b, num)
}

func parseVringState(r Request, p []byte) (index, num uint32, err error) {
	if len(p) != vringStateSize {
		return 0, 0, protoErr("%v payload of %d bytes, want %d", r, len(p), vringStateSize)
	}
	return binary.LittleEndian.Uint32(p[0:]), binary.LittleEndian.Uint32(p[4:]), nil
}

func parseU64(r Request, p []byte) (uint64, error) {
	if len(p) != 8 {
		return 0, protoErr("%v payload of %d bytes, want 8", r, len(p))
	}
	return binary.LittleEndian.Uint64(p), nil
}

// ConfigHeader is the fixed part of a GET_CONFIG/SET_CONFIG payload.
type ConfigHeader struct {
	Offset, Size, Flags uint32
}

func parseConfig(r Request, p []byte) (ConfigHeader, []byte, error) {
	if len(p) < configHeaderSize {
		return ConfigHeader{}, nil, protoErr("%v payload of %d bytes", r, len(p))
	}
	h := ConfigHeader{
		Offset: binary.LittleEndian.Uint32(p[0:]),
		Size:   binary.LittleEndian.Uint32(p[4:]),
		Flags:  binary.LittleEndian.Uint32(p[8:]),
	}
	if h.Size > maxConfigSize || uint64(len(p)) != configHeaderSize+uint64(h.Size) {
		return h, nil, protoErr("%v: config size %d in a %d-byte payload", r, h.Size, len(p))
	}
	return h, p[configHeaderSize:], nil
}

// AppendConfig appends a GET_CONFIG/SET_CONFIG payload.
func AppendConfig(b []byte, h ConfigHeader, data []byte) []byte {
	b = binary.LittleEndian.AppendUint32(b, h.Offset)
	b = binary.LittleEndian.AppendUint32(b, h.Size)
	b = binary.LittleEndian.AppendUint32(b, h.Flags)
	return append(b, data...)
}

// expectedFDs reports how many fds a request must carry, given its payload
// (already size-checked by the caller when needed), or -1 if the request
// takes any count that its handler validates itself.
func expectedFDs(r Request, payload []byte) int {
	switch r {
	case SetMemTable:
		if len(payload) >= 4 {
			return int(binary.LittleEndian.Uint32(payload))
		}
		return -1
	case SetVringKick, SetVringCall, SetVringErr:
		if len(payload) == 8 && binary.LittleEndian.Uint64(payload)&vringNoFDMask != 0 {
			return 0
		}
		return 1
	case SetLogBase, SetLogFD:
		return -1
	}
	if _, known := requestNames[r]; !known {
		return -1
	}
	return 0
}
