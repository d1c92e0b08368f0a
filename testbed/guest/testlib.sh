# Sourced before every per-run test script (/test.sh). The host parses these markers
# out of the serial console (testbed::guest::GuestRun).

# section NAME CMD...: runs CMD, prints its combined output between
# "@@BEGIN NAME@@ CMD" and "@@END NAME rc=N secs=S@@", and returns CMD's status.
section() {
	_name=$1
	shift
	echo "@@BEGIN $_name@@ $*"
	read -r _t0 _ </proc/uptime
	"$@" >/tmp/section.out 2>&1
	_rc=$?
	read -r _t1 _ </proc/uptime
	cat /tmp/section.out
	[ -s /tmp/section.out ] && [ -n "$(tail -c 1 /tmp/section.out)" ] && echo
	echo "@@END $_name rc=$_rc secs=$(awk "BEGIN{print $_t1 - $_t0}")@@"
	return $_rc
}

# must NAME CMD...: like section, but a failure ends the test script with that status.
must() {
	section "$@" || fail "step $1 failed"
}

# fail MESSAGE: ends the test script with a failure the host reports verbatim.
fail() {
	echo "@@FAIL@@ $*"
	exit 1
}

# wait_host TAG: tells the host that the guest is ready for step TAG and blocks until
# the host writes a line to the console; prints and returns that line.
wait_host() {
	echo "@@WAIT $1@@"
	read -r _reply
	echo "@@GOT $1@@ $_reply"
}

# wait_for_path PATH TENTHS: waits up to TENTHS tenths of a second for PATH to exist.
wait_for_path() {
	_i=0
	while [ ! -e "$1" ]; do
		_i=$((_i + 1))
		[ "$_i" -gt "$2" ] && return 1
		sleep 0.1
	done
	return 0
}

# export_nvmet NQN DEVICE ADDR PORT: exports DEVICE as namespace 1 of subsystem NQN
# through the kernel's nvmet target on TCP ADDR:PORT, open to any host.
export_nvmet() {
	_cfg=/sys/kernel/config/nvmet
	_sub=$_cfg/subsystems/$1
	mkdir "$_sub" &&
		echo 1 >"$_sub/attr_allow_any_host" &&
		mkdir "$_sub/namespaces/1" &&
		echo "$2" >"$_sub/namespaces/1/device_path" &&
		echo 1 >"$_sub/namespaces/1/enable" || return 1
	_port=$_cfg/ports/$4
	mkdir "$_port" &&
		echo tcp >"$_port/addr_trtype" &&
		echo ipv4 >"$_port/addr_adrfam" &&
		echo "$3" >"$_port/addr_traddr" &&
		echo "$4" >"$_port/addr_trsvcid" &&
		ln -s "$_sub" "$_port/subsystems/$1"
}
