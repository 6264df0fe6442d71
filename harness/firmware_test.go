package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseFirmware(t *testing.T) {
	for in, want := range map[string]Firmware{"": FirmwareLinux, "linux": FirmwareLinux, "uefi": FirmwareUEFI, "uefi-secure-boot": FirmwareUEFISecureBoot} {
		got, err := ParseFirmware(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got)
	}
	for _, bad := range []string{"bios", "UEFI", "uefi-secureboot", "linux-noinitrd"} {
		_, err := ParseFirmware(bad)
		require.Error(t, err, bad)
		assert.Contains(t, err.Error(), "want linux, uefi or uefi-secure-boot")
	}
}

// writeDescriptor writes a QEMU firmware descriptor in dir naming code and
// vars files it also creates in dir.
func writeDescriptor(t *testing.T, dir, name string, features []string, machine string) (code, vars string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	code = filepath.Join(dir, name+"-CODE.fd")
	vars = filepath.Join(dir, name+"-VARS.fd")
	require.NoError(t, os.WriteFile(code, []byte("code"), 0o644))
	require.NoError(t, os.WriteFile(vars, []byte("vars template"), 0o644))
	quoted := "["
	for i, f := range features {
		if i > 0 {
			quoted += ","
		}
		quoted += fmt.Sprintf("%q", f)
	}
	quoted += "]"
	desc := fmt.Sprintf(`{
  "interface-types": ["uefi"],
  "mapping": {"device": "flash",
    "executable": {"filename": %q, "format": "raw"},
    "nvram-template": {"filename": %q, "format": "raw"}},
  "targets": [{"architecture": "x86_64", "machines": [%q]}],
  "features": %s
}`, code, vars, machine, quoted)
	require.NoError(t, os.WriteFile(filepath.Join(dir, name+".json"), []byte(desc), 0o644))
	return code, vars
}

func TestFindUEFIFirmware(t *testing.T) {
	// Debian's ovmf package's three descriptors, in its order.
	usr := t.TempDir()
	enrolledCode, enrolledVars := writeDescriptor(t, usr, "40-secure-enrolled", []string{"acpi-s3", "enrolled-keys", "requires-smm", "secure-boot"}, "pc-q35-*")
	writeDescriptor(t, usr, "50-secure", []string{"acpi-s3", "requires-smm", "secure-boot"}, "pc-q35-*")
	writeDescriptor(t, usr, "60-plain", []string{"acpi-s3"}, "pc-i440fx-*")

	t.Run("a build for other machines is not taken", func(t *testing.T) {
		fw, err := findUEFIFirmware([]string{usr}, FirmwareUEFI)
		require.NoError(t, err)
		assert.Contains(t, fw.Descriptor, "50-secure.json")
	})
	t.Run("uefi prefers a build without SMM", func(t *testing.T) {
		plainCode, plainVars := writeDescriptor(t, usr, "60-plain", []string{"acpi-s3"}, "pc-q35-*")
		fw, err := findUEFIFirmware([]string{usr}, FirmwareUEFI)
		require.NoError(t, err)
		assert.Equal(t, plainCode, fw.Code)
		assert.Equal(t, plainVars, fw.VarsTemplate)
		assert.False(t, fw.RequiresSMM)
		assert.Equal(t, "raw", fw.CodeFormat)
	})
	t.Run("secure boot takes the build with enrolled keys", func(t *testing.T) {
		fw, err := findUEFIFirmware([]string{usr}, FirmwareUEFISecureBoot)
		require.NoError(t, err)
		assert.Equal(t, enrolledCode, fw.Code)
		assert.Equal(t, enrolledVars, fw.VarsTemplate)
		assert.True(t, fw.RequiresSMM)
	})
	t.Run("an empty file in a later directory masks a descriptor", func(t *testing.T) {
		etc := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(etc, "60-plain.json"), nil, 0o644))
		fw, err := findUEFIFirmware([]string{usr, etc}, FirmwareUEFI)
		require.NoError(t, err)
		assert.Contains(t, fw.Descriptor, "50-secure.json", "the SMM build without keys is the one left")
		assert.True(t, fw.RequiresSMM)
	})
	t.Run("a later directory's descriptor replaces one of the same name", func(t *testing.T) {
		etc := t.TempDir()
		code, _ := writeDescriptor(t, etc, "60-plain", nil, "pc-q35-*")
		fw, err := findUEFIFirmware([]string{usr, etc}, FirmwareUEFI)
		require.NoError(t, err)
		assert.Equal(t, code, fw.Code)
	})
	t.Run("no firmware: say what to install", func(t *testing.T) {
		empty := filepath.Join(t.TempDir(), "none")
		_, err := findUEFIFirmware([]string{empty}, FirmwareUEFISecureBoot)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "--firmware uefi-secure-boot: no UEFI firmware for x86_64 q35 with Secure Boot and enrolled keys")
		assert.Contains(t, err.Error(), "install the ovmf package")
	})
	t.Run("only other machines or broken descriptors", func(t *testing.T) {
		dir := t.TempDir()
		writeDescriptor(t, dir, "10-arm", nil, "virt-*")
		require.NoError(t, os.WriteFile(filepath.Join(dir, "20-broken.json"), []byte("{"), 0o644))
		_, err := findUEFIFirmware([]string{dir}, FirmwareUEFI)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "no UEFI firmware for x86_64 q35")
	})
	t.Run("a descriptor naming a missing file", func(t *testing.T) {
		dir := t.TempDir()
		code, _ := writeDescriptor(t, dir, "60-plain", nil, "pc-q35-*")
		require.NoError(t, os.Remove(code))
		_, err := findUEFIFirmware([]string{dir}, FirmwareUEFI)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "which is missing")
	})
}

// TestFindUEFIFirmwareInstalled checks the choice on this machine's own
// descriptors (Debian's ovmf package), where they are installed.
func TestFindUEFIFirmwareInstalled(t *testing.T) {
	if _, err := os.Stat("/usr/share/qemu/firmware/60-edk2-x86_64.json"); err != nil {
		t.Skip("Debian's ovmf package is not installed")
	}
	fw, err := findUEFIFirmware(DefaultFirmwareDescriptorDirs(), FirmwareUEFI)
	require.NoError(t, err)
	assert.Equal(t, "/usr/share/OVMF/OVMF_CODE_4M.fd", fw.Code)
	assert.Equal(t, "/usr/share/OVMF/OVMF_VARS_4M.fd", fw.VarsTemplate)
	sb, err := findUEFIFirmware(DefaultFirmwareDescriptorDirs(), FirmwareUEFISecureBoot)
	require.NoError(t, err)
	assert.Equal(t, "/usr/share/OVMF/OVMF_CODE_4M.ms.fd", sb.Code)
	assert.Equal(t, "/usr/share/OVMF/OVMF_VARS_4M.ms.fd", sb.VarsTemplate)
	assert.True(t, sb.RequiresSMM)
}

func TestFirmwareQEMUArgs(t *testing.T) {
	plain := uefiFirmware{Code: "/fw/CODE.fd", CodeFormat: "raw", VarsTemplate: "/fw/VARS.fd", VarsFormat: "raw"}
	assert.Equal(t, []string{
		"-drive", "if=pflash,unit=0,format=raw,readonly=on,file=/fw/CODE.fd",
		"-drive", "if=pflash,unit=1,format=raw,file=/w,,1/efivars.raw",
	}, firmwareQEMUArgs(plain, "/w,1/efivars.raw"))

	smm := plain
	smm.RequiresSMM = true
	assert.Equal(t, []string{
		"-drive", "if=pflash,unit=0,format=raw,readonly=on,file=/fw/CODE.fd",
		"-drive", "if=pflash,unit=1,format=raw,file=/w/efivars.raw",
		"-machine", "smm=on",
		"-global", "driver=cfi.pflash01,property=secure,value=on",
		"-global", "ICH9-LPC.disable_s3=1",
	}, firmwareQEMUArgs(smm, "/w/efivars.raw"))
}

func TestCopyVarsTemplate(t *testing.T) {
	dir := t.TempDir()
	tmpl := filepath.Join(dir, "VARS.fd")
	require.NoError(t, os.WriteFile(tmpl, []byte("template"), 0o444))
	dst := filepath.Join(dir, "efivars.raw")
	require.NoError(t, copyVarsTemplate(tmpl, dst))
	data, err := os.ReadFile(dst)
	require.NoError(t, err)
	assert.Equal(t, "template", string(data))
	st, err := os.Stat(dst)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "the VM's own copy is writable, and only by us")
	assert.Error(t, copyVarsTemplate(tmpl, dst), "never overwrites")
}
