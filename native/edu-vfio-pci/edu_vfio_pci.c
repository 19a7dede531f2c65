// SPDX-License-Identifier: GPL-2.0-only
/*
 * edu-vfio-pci: a TEST vfio-pci variant driver for QEMU's emulated "edu"
 * PCI device (1234:11e8) implementing VFIO migration v2 (STOP_COPY, P2P,
 * PRE_COPY, MIG_DATA_SIZE, PRECOPY_INFO), with sysfs knobs for fault
 * injection.  See README.md next to this file for the interface and the
 * stream format.
 *
 * Locking:
 *  - state_mutex protects the migration state, both session objects (all
 *    their fields, including "disabled"), the per-device knobs and the arc
 *    log.  Every path that takes it releases it through edu_state_unlock(),
 *    which applies a reset that was deferred while the mutex was held.
 *  - reset_lock (spinlock) + deferred_reset implement the deferred-reset
 *    pattern of mlx5/mtty: reset_done() runs with the PCI device lock and the
 *    core's memory_lock held and must never block on state_mutex.
 *  - Lock order: state_mutex -> vdev->memory_lock (read, taken inside
 *    vfio_pci_core_ioread32/iowrite32).
 *  - A session file holds a reference on the vfio_device's struct device, so
 *    a data fd that outlives the device (device fd closed, driver unbound)
 *    only ever touches valid memory; it sees "disabled" and fails ENODEV.
 */

#include <linux/anon_inodes.h>
#include <linux/crc32.h>
#include <linux/ctype.h>
#include <linux/delay.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pci.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/uaccess.h>
#include <linux/unaligned.h>
#include <linux/vfio.h>
#include <linux/vfio_pci_core.h>

#define EDU_DRIVER_NAME		"edu-vfio-pci"
#define EDU_MIGVER_PREFIX	"edu-vfio-pci-"
#define EDU_MIGVER_VERSION	1

/* edu BAR0 registers */
#define EDU_REG_LIVE		0x04	/* reads back ~(last value written) */
#define EDU_REG_FACT		0x08	/* write n -> computes n! */
#define EDU_REG_STATUS		0x20
#define EDU_STATUS_COMPUTING	0x01
#define EDU_STATUS_IRQFACT	0x80

/* limits */
#define EDU_MAX_BLOB		(1ULL << 30)
#define EDU_MAX_DIRTY		(1ULL << 30)
#define EDU_MIN_DIRTY		16
#define EDU_MAX_ARC_DELAY_US	10000000U
#define EDU_ARC_LOG_LEN		64
#define EDU_COMPAT_MAX		32

/* stream format (all little endian) */
#define EDU_STREAM_MAGIC	"EDUVFMIG"
#define EDU_STREAM_VERSION	1
#define EDU_HDR_F_PRECOPY	0x1
#define EDU_HDR_LEN		64
#define EDU_REC_HDR_LEN		16
#define EDU_REC_DIRTY		1
#define EDU_REC_REGS		2
#define EDU_REC_END		0x7f
#define EDU_SMALL_PAYLOAD	16
#define EDU_SMALL_REC_LEN	(EDU_REC_HDR_LEN + EDU_SMALL_PAYLOAD)
#define EDU_TAIL_LEN		(2 * EDU_SMALL_REC_LEN)	/* final REGS + END */
#define EDU_END_CRC_OFF		12	/* crc field offset inside END payload */

#define EDU_ST(x) VFIO_DEVICE_STATE_##x

struct edu_regs {
	u32 live;
	u32 fact;
	u32 status;	/* only EDU_STATUS_IRQFACT is kept */
};

enum { EDU_S_HDR, EDU_S_BLOB, EDU_S_POST };
enum { EDU_R_HDR, EDU_R_BLOB, EDU_R_RECHDR, EDU_R_RECPAY, EDU_R_DONE,
       EDU_R_SINK };

struct edu_dev;

static const struct file_operations edu_save_fops;
static const struct file_operations edu_resume_fops;

/* One migration data session (saving or resuming).  Protected by state_mutex. */
struct edu_migf {
	struct file *filp;
	struct edu_dev *edev;
	u8 *buf;			/* PAGE_SIZE bounce buffer */
	bool disabled;
	bool saving;
	u64 pos;			/* bytes produced / consumed */
	u32 crc;			/* running crc32_le state (not inverted) */

	/* saving */
	u64 seed;
	u64 blob_size;
	bool precopy;
	bool final;
	int stage;
	u64 item_len, item_off, item_hdr_len, item_key;
	u8 ibuf[EDU_HDR_LEN];
	u64 pending_dirt;
	u64 dirty_seq;
	u32 nrec;
	struct edu_regs sent_regs;
	struct edu_regs final_regs;
	bool final_regs_sent;
	bool end_sent;

	/* resuming */
	int rstage;
	bool broken;			/* bad magic/version: writes fail EINVAL */
	bool poisoned;			/* deferred failure, reported at commit */
	const char *why;
	u64 limit;			/* 0: no declared length */
	u64 stage_len, stage_off;
	u8 hbuf[EDU_HDR_LEN];
	u32 rtype;
	u64 rkey;
	u64 r_seed, r_blob;
	u64 r_dseq;
	u32 r_nrec;
	struct edu_regs r_regs;
};

struct edu_arc {
	u8 from, to;
	int rc;
};

struct edu_dev {
	struct vfio_pci_core_device core;	/* must stay first */

	struct mutex state_mutex;
	spinlock_t reset_lock;
	bool deferred_reset;
	enum vfio_device_mig_state mig_state;
	bool opened;
	struct edu_migf *saving;
	struct edu_migf *resuming;

	/* logical device state */
	u64 seed;
	u64 blob_size;
	struct edu_regs regs;		/* last values read from / written to BAR0 */

	/* knobs */
	u32 arc_delay_us;
	bool fail_armed;
	int fail_from, fail_to;		/* -1 = any */
	int fail_errno;
	bool fail_always;
	bool fail_to_error;
	u64 fail_count;
	char compat[EDU_COMPAT_MAX + 1];
	char last_error[96];

	/* arc log */
	u64 arcs;
	struct edu_arc log[EDU_ARC_LOG_LEN];
	unsigned int log_head, log_cnt;
};

/* ------------------------------------------------------------------------ */
/* module parameters: defaults for newly bound devices                       */

static unsigned int param_flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P |
				  VFIO_MIGRATION_PRE_COPY;
module_param_named(flags, param_flags, uint, 0644);
MODULE_PARM_DESC(flags, "default migration flags for new devices (default 7)");

static unsigned long long param_blob_size = 65536;
static int blob_size_param_set(const char *val, const struct kernel_param *kp)
{
	unsigned long long v;
	int ret = kstrtoull(val, 0, &v);

	if (ret)
		return ret;
	if (v > EDU_MAX_BLOB)
		return -EINVAL;
	*(unsigned long long *)kp->arg = v;
	return 0;
}
static const struct kernel_param_ops blob_size_param_ops = {
	.set = blob_size_param_set,
	.get = param_get_ullong,
};
module_param_cb(blob_size, &blob_size_param_ops, &param_blob_size, 0644);
MODULE_PARM_DESC(blob_size, "default state blob size in bytes, 0..1073741824 (default 65536)");

static unsigned long long param_seed;
module_param_named(seed, param_seed, ullong, 0644);
MODULE_PARM_DESC(seed, "default blob seed; 0 = derive from the device's BDF (default 0)");

static unsigned int param_arc_delay_us;
static int arc_delay_param_set(const char *val, const struct kernel_param *kp)
{
	unsigned int v;
	int ret = kstrtouint(val, 0, &v);

	if (ret)
		return ret;
	if (v > EDU_MAX_ARC_DELAY_US)
		return -EINVAL;
	*(unsigned int *)kp->arg = v;
	return 0;
}
static const struct kernel_param_ops arc_delay_param_ops = {
	.set = arc_delay_param_set,
	.get = param_get_uint,
};
module_param_cb(arc_delay_us, &arc_delay_param_ops, &param_arc_delay_us, 0644);
MODULE_PARM_DESC(arc_delay_us, "default per-arc delay in microseconds, 0..10000000 (default 0)");

static bool param_dma_logging;
module_param_named(dma_logging, param_dma_logging, bool, 0444);
MODULE_PARM_DESC(dma_logging, "advertise no-op DMA logging ops (default 0; do not use on Debian 6.12)");

static char param_compat[EDU_COMPAT_MAX + 1] = "1";

static bool edu_compat_valid(const char *s, size_t len)
{
	size_t i;

	if (!len || len > EDU_COMPAT_MAX)
		return false;
	for (i = 0; i < len; i++)
		if (!isalnum(s[i]) && !strchr("._+-", s[i]))
			return false;
	return true;
}

static int compat_param_set(const char *val, const struct kernel_param *kp)
{
	char tmp[EDU_COMPAT_MAX + 2];
	size_t len = strlen(val);

	if (len && val[len - 1] == '\n')
		len--;
	if (!edu_compat_valid(val, len))
		return -EINVAL;
	memcpy(tmp, val, len);
	tmp[len] = '\0';
	strscpy(param_compat, tmp, sizeof(param_compat));
	return 0;
}
static int compat_param_get(char *buffer, const struct kernel_param *kp)
{
	return sysfs_emit(buffer, "%s\n", param_compat);
}
static const struct kernel_param_ops compat_param_ops = {
	.set = compat_param_set,
	.get = compat_param_get,
};
module_param_cb(compat, &compat_param_ops, NULL, 0644);
MODULE_PARM_DESC(compat, "default compat token used by migration_version (default \"1\")");

/* ------------------------------------------------------------------------ */
/* helpers                                                                   */

static const char * const edu_state_names[] = {
	[EDU_ST(ERROR)] = "ERROR",
	[EDU_ST(STOP)] = "STOP",
	[EDU_ST(RUNNING)] = "RUNNING",
	[EDU_ST(STOP_COPY)] = "STOP_COPY",
	[EDU_ST(RESUMING)] = "RESUMING",
	[EDU_ST(RUNNING_P2P)] = "RUNNING_P2P",
	[EDU_ST(PRE_COPY)] = "PRE_COPY",
	[EDU_ST(PRE_COPY_P2P)] = "PRE_COPY_P2P",
};
#define EDU_NR_STATES ARRAY_SIZE(edu_state_names)

static const char *edu_state_name(unsigned int s)
{
	return s < EDU_NR_STATES ? edu_state_names[s] : "?";
}

static inline struct edu_dev *edu_from_vdev(struct vfio_device *vdev)
{
	return container_of(vdev, struct edu_dev, core.vdev);
}

static inline struct edu_dev *edu_from_dev(struct device *dev)
{
	struct vfio_pci_core_device *core = dev_get_drvdata(dev);

	return container_of(core, struct edu_dev, core);
}

static inline u64 edu_mix64(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* splitmix64 keyed by (key, word index): word i = mix(key + (i+1)*golden) */
static inline u64 edu_word(u64 key, u64 idx)
{
	return edu_mix64(key + (idx + 1) * 0x9e3779b97f4a7c15ULL);
}

static void edu_gen(u64 key, u64 off, u8 *dst, size_t n)
{
	while (n) {
		unsigned int b = off & 7;
		size_t take = min_t(size_t, 8 - b, n);
		u64 w = edu_word(key, off >> 3);

		if (!b && take == 8) {
			put_unaligned_le64(w, dst);
		} else {
			u8 tmp[8];

			put_unaligned_le64(w, tmp);
			memcpy(dst, tmp + b, take);
		}
		dst += take;
		off += take;
		n -= take;
	}
}

static bool edu_gen_equal(u64 key, u64 off, const u8 *p, size_t n)
{
	u8 tmp[64];

	while (n) {
		size_t k = min_t(size_t, n, sizeof(tmp));

		edu_gen(key, off, tmp, k);
		if (memcmp(tmp, p, k))
			return false;
		p += k;
		off += k;
		n -= k;
	}
	return true;
}

static u64 edu_dirty_key(u64 seed, u64 seq)
{
	return edu_mix64(seed ^ (0xd1b54a32d192ed03ULL * (seq + 1)));
}

/* zlib-compatible crc32 */
static u32 edu_crc32(const void *p, size_t n)
{
	return ~crc32_le(~0U, p, n);
}

static bool edu_regs_equal(const struct edu_regs *a, const struct edu_regs *b)
{
	return a->live == b->live && a->fact == b->fact && a->status == b->status;
}

static u64 edu_full_stream_len(u64 blob_size)
{
	return EDU_HDR_LEN + blob_size + EDU_TAIL_LEN;
}

static __printf(2, 3) void edu_set_last_error(struct edu_dev *e,
					       const char *fmt, ...)
{
	va_list args;

	va_start(args, fmt);
	vscnprintf(e->last_error, sizeof(e->last_error), fmt, args);
	va_end(args);
}

/* ------------------------------------------------------------------------ */
/* register access (state_mutex held)                                        */

static int edu_rd(struct edu_dev *e, u32 off, u32 *val)
{
	void __iomem *io = e->core.barmap[0];

	if (!e->opened || !io)
		return -ENODEV;
	return vfio_pci_core_ioread32(&e->core, true, val, io + off);
}

static int edu_wr(struct edu_dev *e, u32 off, u32 val)
{
	void __iomem *io = e->core.barmap[0];

	if (!e->opened || !io)
		return -ENODEV;
	return vfio_pci_core_iowrite32(&e->core, true, val, io + off);
}

/* Wait (bounded, ~100 ms) for a factorial computation to finish. */
static int edu_wait_fact(struct edu_dev *e)
{
	int i, ret;
	u32 st;

	for (i = 0; i < 200; i++) {
		ret = edu_rd(e, EDU_REG_STATUS, &st);
		if (ret)
			return ret;
		if (!(st & EDU_STATUS_COMPUTING))
			return 0;
		usleep_range(300, 600);
	}
	return -ETIMEDOUT;
}

/*
 * Read the registers from the device if it is open and its memory decode is
 * enabled; otherwise (or on error) return the last known values.
 */
static void edu_sample_regs(struct edu_dev *e, struct edu_regs *r)
{
	struct edu_regs n;
	u32 st;

	lockdep_assert_held(&e->state_mutex);
	if (!e->opened)
		goto cached;
	edu_wait_fact(e);
	if (edu_rd(e, EDU_REG_LIVE, &n.live) ||
	    edu_rd(e, EDU_REG_FACT, &n.fact) ||
	    edu_rd(e, EDU_REG_STATUS, &st))
		goto cached;
	n.status = st & EDU_STATUS_IRQFACT;
	e->regs = n;
cached:
	*r = e->regs;
}

/* n! mod 2^32 for n = 0..34 (34! mod 2^32 == 0) */
static int edu_fact_input(u32 v, u32 *n)
{
	u32 f = 1, i;

	if (v == 1) {
		*n = 1;
		return 0;
	}
	for (i = 2; i <= 34; i++) {
		f *= i;
		if (f == v) {
			*n = i;
			return 0;
		}
	}
	return -ENOENT;
}

/* Write a register set to the device so that it reads back as @r. */
static void edu_apply_regs(struct edu_dev *e, const struct edu_regs *r)
{
	u32 n;
	int ret;

	e->regs = *r;
	if (!e->opened)
		return;
	/* no factorial interrupt while restoring */
	ret = edu_wr(e, EDU_REG_STATUS, 0);
	if (ret)
		goto out;
	ret = edu_wr(e, EDU_REG_LIVE, ~r->live);
	if (ret)
		goto out;
	edu_wait_fact(e);
	/* the register shows n!; write back the smallest n with that factorial */
	if (edu_fact_input(r->fact, &n))
		n = r->fact;	/* not a factorial value: source was mid-computation */
	ret = edu_wr(e, EDU_REG_FACT, n);
	if (ret)
		goto out;
	edu_wait_fact(e);
	ret = edu_wr(e, EDU_REG_STATUS, r->status & EDU_STATUS_IRQFACT);
out:
	if (ret)
		pci_info(e->core.pdev, "register restore incomplete (%d), values cached\n",
			 ret);
}

/* ------------------------------------------------------------------------ */
/* deferred reset / state mutex                                              */

static void edu_disable_sessions(struct edu_dev *e)
{
	if (e->saving) {
		e->saving->disabled = true;
		fput(e->saving->filp);
		e->saving = NULL;
	}
	if (e->resuming) {
		e->resuming->disabled = true;
		fput(e->resuming->filp);
		e->resuming = NULL;
	}
}

static void edu_state_unlock(struct edu_dev *e)
{
again:
	spin_lock(&e->reset_lock);
	if (e->deferred_reset) {
		e->deferred_reset = false;
		spin_unlock(&e->reset_lock);
		e->mig_state = EDU_ST(RUNNING);
		edu_disable_sessions(e);
		goto again;
	}
	mutex_unlock(&e->state_mutex);
	spin_unlock(&e->reset_lock);
}

static void edu_reset_done(struct pci_dev *pdev)
{
	struct vfio_pci_core_device *core = dev_get_drvdata(&pdev->dev);
	struct edu_dev *e;

	if (!core)
		return;
	e = container_of(core, struct edu_dev, core);
	/*
	 * Called with the device lock and the core's memory_lock held: never
	 * block on state_mutex; if it is busy the holder applies the reset.
	 */
	spin_lock(&e->reset_lock);
	e->deferred_reset = true;
	if (!mutex_trylock(&e->state_mutex)) {
		spin_unlock(&e->reset_lock);
		return;
	}
	spin_unlock(&e->reset_lock);
	edu_state_unlock(e);
}

/* ------------------------------------------------------------------------ */
/* sessions                                                                  */

static int edu_migf_release(struct inode *inode, struct file *filp)
{
	struct edu_migf *m = filp->private_data;
	struct edu_dev *e = m->edev;

	/* The device dropped its reference (and disabled us) before this. */
	kfree(m->buf);
	kfree(m);
	put_device(&e->core.vdev.device);
	return 0;
}

static struct edu_migf *edu_migf_alloc(struct edu_dev *e, bool saving)
{
	struct edu_migf *m;
	int ret;

	m = kzalloc(sizeof(*m), GFP_KERNEL_ACCOUNT);
	if (!m)
		return ERR_PTR(-ENOMEM);
	m->buf = kmalloc(PAGE_SIZE, GFP_KERNEL_ACCOUNT);
	if (!m->buf) {
		ret = -ENOMEM;
		goto err;
	}
	m->filp = anon_inode_getfile(saving ? "[edu_vfio_mig_save]" :
				     "[edu_vfio_mig_resume]",
				     saving ? &edu_save_fops : &edu_resume_fops,
				     m, saving ? O_RDONLY : O_WRONLY);
	if (IS_ERR(m->filp)) {
		ret = PTR_ERR(m->filp);
		goto err;
	}
	stream_open(m->filp->f_inode, m->filp);
	get_device(&e->core.vdev.device);
	m->edev = e;
	m->saving = saving;
	m->crc = ~0U;
	return m;
err:
	kfree(m->buf);
	kfree(m);
	return ERR_PTR(ret);
}

static void edu_build_header(struct edu_migf *m, const struct edu_regs *r)
{
	u8 *h = m->ibuf;

	memset(h, 0, EDU_HDR_LEN);
	memcpy(h, EDU_STREAM_MAGIC, 8);
	put_unaligned_le32(EDU_STREAM_VERSION, h + 8);
	put_unaligned_le32(m->precopy ? EDU_HDR_F_PRECOPY : 0, h + 12);
	put_unaligned_le64(m->seed, h + 16);
	put_unaligned_le64(m->blob_size, h + 24);
	put_unaligned_le64(m->precopy ? 0 : edu_full_stream_len(m->blob_size),
			   h + 32);
	put_unaligned_le32(r->live, h + 40);
	put_unaligned_le32(r->fact, h + 44);
	put_unaligned_le32(r->status, h + 48);
	/* 52..59 reserved, zero */
	put_unaligned_le32(edu_crc32(h, 60), h + 60);
}

static struct file *edu_new_saving(struct edu_dev *e, bool precopy)
{
	struct edu_migf *m;
	struct edu_regs r;

	m = edu_migf_alloc(e, true);
	if (IS_ERR(m))
		return ERR_CAST(m);
	edu_sample_regs(e, &r);
	m->seed = e->seed;
	m->blob_size = e->blob_size;
	m->precopy = precopy;
	m->final = !precopy;
	m->sent_regs = r;
	m->final_regs = r;
	edu_build_header(m, &r);
	m->stage = EDU_S_HDR;
	m->item_hdr_len = EDU_HDR_LEN;
	m->item_len = EDU_HDR_LEN;
	m->item_off = 0;
	e->saving = m;
	get_file(m->filp);
	return m->filp;
}

static struct file *edu_new_resuming(struct edu_dev *e)
{
	struct edu_migf *m;

	m = edu_migf_alloc(e, false);
	if (IS_ERR(m))
		return ERR_CAST(m);
	m->rstage = EDU_R_HDR;
	m->stage_len = EDU_HDR_LEN;
	e->resuming = m;
	get_file(m->filp);
	return m->filp;
}

/* ---- saving side ---- */

static void edu_put_rec_hdr(u8 *p, u32 type, u64 len)
{
	put_unaligned_le32(type, p);
	put_unaligned_le32(0, p + 4);
	put_unaligned_le64(len, p + 8);
}

static void edu_set_small_item(struct edu_migf *m)
{
	m->item_hdr_len = EDU_SMALL_REC_LEN;
	m->item_len = EDU_SMALL_REC_LEN;
	m->item_off = 0;
}

static void edu_build_regs_rec(struct edu_migf *m, const struct edu_regs *r)
{
	u8 *p = m->ibuf;

	edu_put_rec_hdr(p, EDU_REC_REGS, EDU_SMALL_PAYLOAD);
	put_unaligned_le32(r->live, p + 16);
	put_unaligned_le32(r->fact, p + 20);
	put_unaligned_le32(r->status, p + 24);
	put_unaligned_le32(0, p + 28);
	edu_set_small_item(m);
	m->nrec++;
}

/* Set up the next item of the saving stream.  false: nothing (more) now. */
static bool edu_save_next(struct edu_migf *m, bool *eof)
{
	struct edu_dev *e = m->edev;

	*eof = false;
	if (m->stage == EDU_S_HDR && m->blob_size) {
		m->stage = EDU_S_BLOB;
		m->item_hdr_len = 0;
		m->item_key = m->seed;
		m->item_len = m->blob_size;
		m->item_off = 0;
		return true;
	}
	m->stage = EDU_S_POST;
	m->item_len = 0;
	m->item_off = 0;
	m->item_hdr_len = 0;

	if (m->pending_dirt) {
		edu_put_rec_hdr(m->ibuf, EDU_REC_DIRTY,
				m->pending_dirt - EDU_REC_HDR_LEN);
		m->item_hdr_len = EDU_REC_HDR_LEN;
		m->item_key = edu_dirty_key(m->seed, m->dirty_seq++);
		m->item_len = m->pending_dirt;
		m->pending_dirt = 0;
		m->nrec++;
		return true;
	}
	if (!m->final) {
		struct edu_regs r;

		edu_sample_regs(e, &r);
		if (edu_regs_equal(&r, &m->sent_regs))
			return false;
		m->sent_regs = r;
		edu_build_regs_rec(m, &r);
		return true;
	}
	if (!m->final_regs_sent) {
		m->final_regs_sent = true;
		m->sent_regs = m->final_regs;
		edu_build_regs_rec(m, &m->final_regs);
		return true;
	}
	if (!m->end_sent) {
		u8 *p = m->ibuf;

		m->end_sent = true;
		edu_put_rec_hdr(p, EDU_REC_END, EDU_SMALL_PAYLOAD);
		put_unaligned_le64(m->pos + EDU_SMALL_REC_LEN, p + 16);
		put_unaligned_le32(m->nrec, p + 24);
		put_unaligned_le32(~crc32_le(m->crc, p, EDU_REC_HDR_LEN +
					     EDU_END_CRC_OFF), p + 28);
		edu_set_small_item(m);
		return true;
	}
	*eof = true;
	return false;
}

static void edu_item_bytes(struct edu_migf *m, u8 *dst, size_t n)
{
	u64 off = m->item_off;

	if (off < m->item_hdr_len) {
		size_t k = min_t(u64, n, m->item_hdr_len - off);

		memcpy(dst, m->ibuf + off, k);
		dst += k;
		off += k;
		n -= k;
	}
	if (n)
		edu_gen(m->item_key, off - m->item_hdr_len, dst, n);
}

static u64 edu_save_initial_left(struct edu_migf *m)
{
	switch (m->stage) {
	case EDU_S_HDR:
		return (m->item_len - m->item_off) + m->blob_size;
	case EDU_S_BLOB:
		return m->item_len - m->item_off;
	default:
		return 0;
	}
}

/* bytes a read-to-EOF would produce if STOP_COPY were entered now */
static u64 edu_save_remaining(struct edu_migf *m)
{
	u64 rem = edu_save_initial_left(m);

	if (m->stage == EDU_S_POST)
		rem += m->item_len - m->item_off;
	rem += m->pending_dirt;
	if (!m->final) {
		rem += EDU_TAIL_LEN;
	} else {
		if (!m->final_regs_sent)
			rem += EDU_SMALL_REC_LEN;
		if (!m->end_sent)
			rem += EDU_SMALL_REC_LEN;
	}
	return rem;
}

static ssize_t edu_save_read(struct file *filp, char __user *ubuf, size_t len,
			     loff_t *ppos)
{
	struct edu_migf *m = filp->private_data;
	struct edu_dev *e = m->edev;
	ssize_t ret = 0;
	size_t done = 0;

	if (ppos)
		return -ESPIPE;

	mutex_lock(&e->state_mutex);
	if (m->disabled) {
		ret = -ENODEV;
		goto out;
	}
	while (done < len) {
		size_t n;

		if (m->item_off >= m->item_len) {
			bool eof;

			if (!edu_save_next(m, &eof)) {
				/* PRE_COPY: temporary end of data -> ENOMSG */
				ret = eof ? 0 : -ENOMSG;
				break;
			}
			continue;
		}
		n = min_t(u64, len - done, m->item_len - m->item_off);
		n = min_t(size_t, n, PAGE_SIZE);
		edu_item_bytes(m, m->buf, n);
		if (copy_to_user(ubuf + done, m->buf, n)) {
			ret = -EFAULT;
			break;
		}
		m->crc = crc32_le(m->crc, m->buf, n);
		m->item_off += n;
		m->pos += n;
		done += n;
		if (fatal_signal_pending(current))
			break;
		cond_resched();
	}
out:
	edu_state_unlock(e);
	return done ? done : ret;
}

static long edu_save_ioctl(struct file *filp, unsigned int cmd,
			   unsigned long arg)
{
	struct edu_migf *m = filp->private_data;
	struct edu_dev *e = m->edev;
	struct vfio_precopy_info info;
	unsigned long minsz;
	long ret = 0;

	if (cmd != VFIO_MIG_GET_PRECOPY_INFO)
		return -ENOTTY;

	minsz = offsetofend(struct vfio_precopy_info, dirty_bytes);
	if (copy_from_user(&info, (void __user *)arg, minsz))
		return -EFAULT;
	if (info.argsz < minsz)
		return -EINVAL;

	mutex_lock(&e->state_mutex);
	if (e->mig_state != EDU_ST(PRE_COPY) && e->mig_state != EDU_ST(PRE_COPY_P2P)) {
		ret = -EINVAL;
		goto unlock;
	}
	if (m->disabled) {
		ret = -ENODEV;
		goto unlock;
	}
	info.initial_bytes = edu_save_initial_left(m);
	info.dirty_bytes = m->pending_dirt;
	if (m->stage == EDU_S_POST)
		info.dirty_bytes += m->item_len - m->item_off;
	if (!m->final) {
		struct edu_regs r;

		edu_sample_regs(e, &r);
		if (!edu_regs_equal(&r, &m->sent_regs))
			info.dirty_bytes += EDU_SMALL_REC_LEN;
	}
	/* flags are left as the caller passed them (like in-tree drivers) */
unlock:
	edu_state_unlock(e);
	if (!ret && copy_to_user((void __user *)arg, &info, minsz))
		ret = -EFAULT;
	return ret;
}

/* ---- resuming side ---- */

static void edu_res_poison(struct edu_migf *m, const char *why)
{
	if (!m->poisoned) {
		m->poisoned = true;
		m->why = why;
	}
	m->rstage = EDU_R_SINK;
}

static void edu_res_to_rechdr(struct edu_migf *m)
{
	m->rstage = EDU_R_RECHDR;
	m->stage_len = EDU_REC_HDR_LEN;
	m->stage_off = 0;
}

static int edu_res_header(struct edu_migf *m)
{
	const u8 *h = m->hbuf;
	u32 flags;
	u64 stream_len, expect;

	if (memcmp(h, EDU_STREAM_MAGIC, 8)) {
		m->why = "bad magic";
		return -EINVAL;
	}
	if (get_unaligned_le32(h + 8) != EDU_STREAM_VERSION) {
		m->why = "unsupported version";
		return -EINVAL;
	}
	if (get_unaligned_le32(h + 60) != edu_crc32(h, 60)) {
		edu_res_poison(m, "header crc mismatch");
		return 0;
	}
	flags = get_unaligned_le32(h + 12);
	m->r_seed = get_unaligned_le64(h + 16);
	m->r_blob = get_unaligned_le64(h + 24);
	stream_len = get_unaligned_le64(h + 32);
	m->r_regs.live = get_unaligned_le32(h + 40);
	m->r_regs.fact = get_unaligned_le32(h + 44);
	m->r_regs.status = get_unaligned_le32(h + 48);

	if (flags & ~EDU_HDR_F_PRECOPY) {
		edu_res_poison(m, "unknown header flags");
		return 0;
	}
	if (get_unaligned_le32(h + 52) || get_unaligned_le32(h + 56) ||
	    (m->r_regs.status & ~EDU_STATUS_IRQFACT)) {
		edu_res_poison(m, "reserved header bits set");
		return 0;
	}
	if (m->r_blob > EDU_MAX_BLOB) {
		edu_res_poison(m, "blob_size too large");
		return 0;
	}
	expect = (flags & EDU_HDR_F_PRECOPY) ? 0 : edu_full_stream_len(m->r_blob);
	if (stream_len != expect) {
		edu_res_poison(m, "inconsistent stream length");
		return 0;
	}
	m->limit = stream_len;
	if (m->r_blob) {
		m->rstage = EDU_R_BLOB;
		m->stage_len = m->r_blob;
		m->stage_off = 0;
	} else {
		edu_res_to_rechdr(m);
	}
	return 0;
}

static void edu_res_rechdr(struct edu_migf *m)
{
	const u8 *p = m->hbuf;
	u64 len = get_unaligned_le64(p + 8);

	m->rtype = get_unaligned_le32(p);
	if (get_unaligned_le32(p + 4)) {
		edu_res_poison(m, "reserved record bits set");
		return;
	}
	switch (m->rtype) {
	case EDU_REC_DIRTY:
		if (len > EDU_MAX_DIRTY - EDU_REC_HDR_LEN) {
			edu_res_poison(m, "dirty record too large");
			return;
		}
		m->rkey = edu_dirty_key(m->r_seed, m->r_dseq++);
		m->r_nrec++;
		break;
	case EDU_REC_REGS:
		m->r_nrec++;
		fallthrough;
	case EDU_REC_END:
		if (len != EDU_SMALL_PAYLOAD) {
			edu_res_poison(m, "bad record length");
			return;
		}
		break;
	default:
		edu_res_poison(m, "unknown record type");
		return;
	}
	if (!len) {
		edu_res_to_rechdr(m);
		return;
	}
	m->rstage = EDU_R_RECPAY;
	m->stage_len = len;
	m->stage_off = 0;
}

static void edu_res_recpay(struct edu_migf *m)
{
	const u8 *p = m->hbuf;

	switch (m->rtype) {
	case EDU_REC_DIRTY:
		break;
	case EDU_REC_REGS:
		if (get_unaligned_le32(p + 8) & ~EDU_STATUS_IRQFACT ||
		    get_unaligned_le32(p + 12)) {
			edu_res_poison(m, "reserved register bits set");
			return;
		}
		m->r_regs.live = get_unaligned_le32(p);
		m->r_regs.fact = get_unaligned_le32(p + 4);
		m->r_regs.status = get_unaligned_le32(p + 8);
		break;
	case EDU_REC_END:
		if (get_unaligned_le64(p) != m->pos) {
			edu_res_poison(m, "total length mismatch");
			return;
		}
		if (get_unaligned_le32(p + 8) != m->r_nrec) {
			edu_res_poison(m, "record count mismatch");
			return;
		}
		if (get_unaligned_le32(p + 12) != ~m->crc) {
			edu_res_poison(m, "checksum mismatch");
			return;
		}
		if (m->limit && m->pos != m->limit) {
			edu_res_poison(m, "length differs from header");
			return;
		}
		m->rstage = EDU_R_DONE;
		return;
	}
	edu_res_to_rechdr(m);
}

/* Consume bytes; returns bytes used or -EINVAL for a bad magic/version. */
static ssize_t edu_res_feed(struct edu_migf *m, const u8 *p, size_t n)
{
	size_t used = 0;
	int ret;

	while (used < n && m->rstage != EDU_R_DONE) {
		size_t k, c;
		bool bad = false;

		if (m->rstage == EDU_R_SINK) {
			m->pos += n - used;
			return n;
		}
		k = min_t(u64, n - used, m->stage_len - m->stage_off);
		c = k;	/* bytes covered by the checksum */
		switch (m->rstage) {
		case EDU_R_HDR:
		case EDU_R_RECHDR:
			memcpy(m->hbuf + m->stage_off, p + used, k);
			break;
		case EDU_R_BLOB:
			bad = !edu_gen_equal(m->r_seed, m->stage_off, p + used, k);
			break;
		case EDU_R_RECPAY:
			if (m->rtype == EDU_REC_DIRTY) {
				bad = !edu_gen_equal(m->rkey, m->stage_off,
						     p + used, k);
				break;
			}
			memcpy(m->hbuf + m->stage_off, p + used, k);
			if (m->rtype == EDU_REC_END)
				c = m->stage_off >= EDU_END_CRC_OFF ? 0 :
				    min_t(size_t, k, EDU_END_CRC_OFF - m->stage_off);
			break;
		}
		m->crc = crc32_le(m->crc, p + used, c);
		m->stage_off += k;
		m->pos += k;
		used += k;
		if (bad) {
			edu_res_poison(m, m->rstage == EDU_R_BLOB ?
				       "blob content mismatch" :
				       "dirty data mismatch");
			continue;
		}
		if (m->stage_off < m->stage_len)
			continue;
		switch (m->rstage) {
		case EDU_R_HDR:
			ret = edu_res_header(m);
			if (ret)
				return ret;
			break;
		case EDU_R_BLOB:
			edu_res_to_rechdr(m);
			break;
		case EDU_R_RECHDR:
			edu_res_rechdr(m);
			break;
		case EDU_R_RECPAY:
			edu_res_recpay(m);
			break;
		}
	}
	return used;
}

static ssize_t edu_resume_write(struct file *filp, const char __user *ubuf,
				size_t len, loff_t *ppos)
{
	struct edu_migf *m = filp->private_data;
	struct edu_dev *e = m->edev;
	ssize_t ret = 0;
	size_t done = 0;

	if (ppos)
		return -ESPIPE;

	mutex_lock(&e->state_mutex);
	if (m->disabled) {
		ret = -ENODEV;
		goto out;
	}
	if (m->broken) {
		ret = -EINVAL;
		goto out;
	}
	while (done < len) {
		u64 room = U64_MAX;
		ssize_t used;
		size_t n;

		if (m->rstage == EDU_R_DONE)
			room = 0;
		else if (m->limit)
			room = m->limit > m->pos ? m->limit - m->pos : 0;
		if (!room) {
			ret = -EFBIG;
			break;
		}
		n = min_t(size_t, len - done, PAGE_SIZE);
		n = min_t(u64, n, room);
		if (copy_from_user(m->buf, ubuf + done, n)) {
			ret = -EFAULT;
			break;
		}
		used = edu_res_feed(m, m->buf, n);
		if (used < 0) {
			m->broken = true;
			edu_set_last_error(e, "resume: %s", m->why);
			pci_info(e->core.pdev, "resume stream rejected: %s\n",
				 m->why);
			ret = used;
			done = 0;
			break;
		}
		done += used;
		if (used < n)
			break;	/* end record reached; extra bytes refused next */
		if (fatal_signal_pending(current))
			break;
		cond_resched();
	}
out:
	edu_state_unlock(e);
	return done ? done : ret;
}

static int edu_commit_resume(struct edu_dev *e)
{
	struct edu_migf *m = e->resuming;

	if (!m)
		return -EINVAL;
	if (m->broken || m->poisoned || m->rstage != EDU_R_DONE) {
		const char *why = m->why;

		if (!m->broken && !m->poisoned)
			why = "incomplete stream";
		edu_set_last_error(e, "resume: %s (%llu bytes)", why, m->pos);
		pci_info(e->core.pdev, "resume failed: %s after %llu bytes\n",
			 why, m->pos);
		return -EINVAL;
	}
	e->seed = m->r_seed;
	e->blob_size = m->r_blob;
	edu_apply_regs(e, &m->r_regs);
	edu_set_last_error(e, "ok");
	return 0;
}

static const struct file_operations edu_save_fops = {
	.owner = THIS_MODULE,
	.read = edu_save_read,
	.unlocked_ioctl = edu_save_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.release = edu_migf_release,
};

static const struct file_operations edu_resume_fops = {
	.owner = THIS_MODULE,
	.write = edu_resume_write,
	.release = edu_migf_release,
};

/* ------------------------------------------------------------------------ */
/* FSM                                                                       */

static void edu_log_arc(struct edu_dev *e, u32 from, u32 to, int rc)
{
	struct edu_arc *a = &e->log[e->log_head];

	a->from = from;
	a->to = to;
	a->rc = rc;
	e->log_head = (e->log_head + 1) % EDU_ARC_LOG_LEN;
	if (e->log_cnt < EDU_ARC_LOG_LEN)
		e->log_cnt++;
	e->arcs++;
}

static bool edu_fail_hits(struct edu_dev *e, u32 from, u32 to)
{
	return e->fail_armed &&
	       (e->fail_from < 0 || e->fail_from == from) &&
	       (e->fail_to < 0 || e->fail_to == to);
}

static bool edu_is_arc(u32 cur, u32 next, u32 a, u32 b)
{
	return cur == a && next == b;
}

/* Execute exactly one FSM arc.  Updates mig_state only on ERROR outcomes. */
static struct file *edu_step(struct edu_dev *e, u32 next)
{
	u32 cur = e->mig_state;
	struct file *res = NULL;
	int rc = 0;

	if (e->arc_delay_us)
		fsleep(e->arc_delay_us);

	if (edu_fail_hits(e, cur, next)) {
		rc = -e->fail_errno;
		e->fail_count++;
		if (!e->fail_always)
			e->fail_armed = false;
		if (e->fail_to_error) {
			e->mig_state = EDU_ST(ERROR);
			edu_disable_sessions(e);
		}
		goto out;
	}

	if (edu_is_arc(cur, next, EDU_ST(RUNNING), EDU_ST(RUNNING_P2P)) ||
	    edu_is_arc(cur, next, EDU_ST(RUNNING_P2P), EDU_ST(RUNNING)) ||
	    edu_is_arc(cur, next, EDU_ST(RUNNING_P2P), EDU_ST(STOP)) ||
	    edu_is_arc(cur, next, EDU_ST(STOP), EDU_ST(RUNNING_P2P)) ||
	    edu_is_arc(cur, next, EDU_ST(RUNNING), EDU_ST(STOP)) ||
	    edu_is_arc(cur, next, EDU_ST(STOP), EDU_ST(RUNNING)) ||
	    edu_is_arc(cur, next, EDU_ST(PRE_COPY), EDU_ST(PRE_COPY_P2P)) ||
	    edu_is_arc(cur, next, EDU_ST(PRE_COPY_P2P), EDU_ST(PRE_COPY))) {
		/* the edu device does no DMA: nothing to quiesce */
	} else if (edu_is_arc(cur, next, EDU_ST(RUNNING), EDU_ST(PRE_COPY)) ||
		   edu_is_arc(cur, next, EDU_ST(RUNNING_P2P), EDU_ST(PRE_COPY_P2P))) {
		res = edu_new_saving(e, true);
	} else if (edu_is_arc(cur, next, EDU_ST(STOP), EDU_ST(STOP_COPY))) {
		res = edu_new_saving(e, false);
	} else if (edu_is_arc(cur, next, EDU_ST(PRE_COPY_P2P), EDU_ST(STOP_COPY)) ||
		   edu_is_arc(cur, next, EDU_ST(PRE_COPY), EDU_ST(STOP_COPY))) {
		if (!e->saving) {
			rc = -EINVAL;
		} else {
			edu_sample_regs(e, &e->saving->final_regs);
			e->saving->final = true;
		}
	} else if (edu_is_arc(cur, next, EDU_ST(STOP_COPY), EDU_ST(STOP)) ||
		   edu_is_arc(cur, next, EDU_ST(PRE_COPY), EDU_ST(RUNNING)) ||
		   edu_is_arc(cur, next, EDU_ST(PRE_COPY_P2P), EDU_ST(RUNNING_P2P))) {
		edu_disable_sessions(e);
	} else if (edu_is_arc(cur, next, EDU_ST(STOP), EDU_ST(RESUMING))) {
		res = edu_new_resuming(e);
	} else if (edu_is_arc(cur, next, EDU_ST(RESUMING), EDU_ST(STOP))) {
		rc = edu_commit_resume(e);
		if (rc)
			e->mig_state = EDU_ST(ERROR);
		edu_disable_sessions(e);
	} else {
		rc = -EINVAL;	/* not an arc vfio_mig_get_next_state() uses */
	}
	if (IS_ERR(res)) {
		rc = PTR_ERR(res);
		res = NULL;
	}
out:
	edu_log_arc(e, cur, next, rc);
	return rc ? ERR_PTR(rc) : res;
}

/* required migration_flags per state, ERROR never valid (as in vfio_main.c) */
static bool edu_state_supported(u32 flags, u32 s)
{
	static const u32 need[] = {
		[EDU_ST(STOP)] = VFIO_MIGRATION_STOP_COPY,
		[EDU_ST(RUNNING)] = VFIO_MIGRATION_STOP_COPY,
		[EDU_ST(STOP_COPY)] = VFIO_MIGRATION_STOP_COPY,
		[EDU_ST(RESUMING)] = VFIO_MIGRATION_STOP_COPY,
		[EDU_ST(RUNNING_P2P)] = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
		[EDU_ST(PRE_COPY)] = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
		[EDU_ST(PRE_COPY_P2P)] = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P |
				    VFIO_MIGRATION_PRE_COPY,
	};

	if (s == EDU_ST(ERROR) || s >= ARRAY_SIZE(need))
		return false;
	return (need[s] & flags) == need[s];
}

static struct file *edu_set_state(struct vfio_device *vdev,
				  enum vfio_device_mig_state new_state)
{
	struct edu_dev *e = edu_from_vdev(vdev);
	struct file *res = NULL;
	u32 flags;

	mutex_lock(&e->state_mutex);
	flags = READ_ONCE(vdev->migration_flags);
	if (e->mig_state == new_state)
		goto out;
	/*
	 * Same answers as vfio_mig_get_next_state(), but without its WARN for a
	 * current state the flags do not allow (ERROR, or flags lacking
	 * STOP_COPY) and without its endless loop for STOP_COPY -> PRE_COPY*.
	 */
	if (!edu_state_supported(flags, e->mig_state) ||
	    !edu_state_supported(flags, new_state) ||
	    (e->mig_state == EDU_ST(STOP_COPY) &&
	     (new_state == EDU_ST(PRE_COPY) || new_state == EDU_ST(PRE_COPY_P2P)))) {
		res = ERR_PTR(-EINVAL);
		goto out;
	}
	while (e->mig_state != new_state) {
		enum vfio_device_mig_state next;
		int rc = vfio_mig_get_next_state(vdev, e->mig_state, new_state,
						 &next);

		if (rc) {
			res = ERR_PTR(rc);
			break;
		}
		res = edu_step(e, next);
		if (IS_ERR(res))
			break;
		e->mig_state = next;
		if (res && next != new_state) {
			/* only the final arc may return an fd; cannot happen */
			fput(res);
			res = ERR_PTR(-EINVAL);
			break;
		}
	}
out:
	edu_state_unlock(e);
	return res;
}

static int edu_get_state(struct vfio_device *vdev,
			 enum vfio_device_mig_state *curr_state)
{
	struct edu_dev *e = edu_from_vdev(vdev);

	mutex_lock(&e->state_mutex);
	*curr_state = e->mig_state;
	edu_state_unlock(e);
	return 0;
}

static int edu_get_data_size(struct vfio_device *vdev,
			     unsigned long *stop_copy_length)
{
	struct edu_dev *e = edu_from_vdev(vdev);

	mutex_lock(&e->state_mutex);
	if (e->saving)
		*stop_copy_length = edu_save_remaining(e->saving);
	else
		*stop_copy_length = edu_full_stream_len(e->blob_size);
	edu_state_unlock(e);
	return 0;
}

static const struct vfio_migration_ops edu_mig_ops = {
	.migration_set_state = edu_set_state,
	.migration_get_state = edu_get_state,
	.migration_get_data_size = edu_get_data_size,
};

/* no-op DMA logging (only with dma_logging=1), like the mtty sample */
static int edu_log_start(struct vfio_device *vdev, struct rb_root_cached *ranges,
			 u32 nnodes, u64 *page_size)
{
	return 0;
}

static int edu_log_stop(struct vfio_device *vdev)
{
	return 0;
}

static int edu_log_read_and_clear(struct vfio_device *vdev, unsigned long iova,
				  unsigned long length, struct iova_bitmap *dirty)
{
	return 0;
}

static const struct vfio_log_ops edu_log_ops = {
	.log_start = edu_log_start,
	.log_stop = edu_log_stop,
	.log_read_and_clear = edu_log_read_and_clear,
};

/* ------------------------------------------------------------------------ */
/* vfio_device_ops                                                           */

static int edu_init_dev(struct vfio_device *vdev)
{
	struct edu_dev *e = edu_from_vdev(vdev);

	mutex_init(&e->state_mutex);
	spin_lock_init(&e->reset_lock);
	e->mig_state = EDU_ST(RUNNING);
	return vfio_pci_core_init_dev(vdev);
}

static void edu_release_dev(struct vfio_device *vdev)
{
	struct edu_dev *e = edu_from_vdev(vdev);

	mutex_destroy(&e->state_mutex);
	vfio_pci_core_release_dev(vdev);
}

static int edu_open_device(struct vfio_device *vdev)
{
	struct edu_dev *e = edu_from_vdev(vdev);
	struct edu_regs r;
	int ret;

	ret = vfio_pci_core_enable(&e->core);
	if (ret)
		return ret;
	ret = vfio_pci_core_setup_barmap(&e->core, 0);
	if (ret) {
		vfio_pci_core_disable(&e->core);
		return ret;
	}
	mutex_lock(&e->state_mutex);
	e->mig_state = EDU_ST(RUNNING);
	e->opened = true;
	edu_sample_regs(e, &r);
	edu_state_unlock(e);
	vfio_pci_core_finish_enable(&e->core);
	return 0;
}

static void edu_close_device(struct vfio_device *vdev)
{
	struct edu_dev *e = edu_from_vdev(vdev);
	struct edu_regs r;

	mutex_lock(&e->state_mutex);
	edu_sample_regs(e, &r);	/* refresh the cache while BAR0 is mapped */
	edu_disable_sessions(e);
	e->mig_state = EDU_ST(RUNNING);
	e->opened = false;
	edu_state_unlock(e);
	vfio_pci_core_close_device(vdev);
}

static void edu_mig_reset(struct edu_dev *e)
{
	mutex_lock(&e->state_mutex);
	e->mig_state = EDU_ST(RUNNING);
	edu_disable_sessions(e);
	edu_state_unlock(e);
}

static long edu_ioctl(struct vfio_device *vdev, unsigned int cmd,
		      unsigned long arg)
{
	struct edu_dev *e = edu_from_vdev(vdev);
	long ret;

	/*
	 * No PCI reset method (e.g. edu on the root bus: no FLR, no PM, no
	 * bus reset): the core would fail with EINVAL.  Reset at least the
	 * migration state so ERROR stays recoverable.  GET_INFO does not
	 * report VFIO_DEVICE_FLAGS_RESET in that case.
	 */
	if (cmd == VFIO_DEVICE_RESET && !e->core.reset_works) {
		edu_mig_reset(e);
		return 0;
	}
	ret = vfio_pci_core_ioctl(vdev, cmd, arg);
	/*
	 * reset_done() already handled a successful function reset; repeat
	 * it here so the migration state is reset even if the PCI core's
	 * reset path did not call the error handlers.
	 */
	if (cmd == VFIO_DEVICE_RESET && !ret)
		edu_mig_reset(e);
	return ret;
}

static const struct vfio_device_ops edu_vfio_ops = {
	.name = EDU_DRIVER_NAME,
	.init = edu_init_dev,
	.release = edu_release_dev,
	.open_device = edu_open_device,
	.close_device = edu_close_device,
	.ioctl = edu_ioctl,
	.device_feature = vfio_pci_core_ioctl_feature,
	.read = vfio_pci_core_read,
	.write = vfio_pci_core_write,
	.mmap = vfio_pci_core_mmap,
	.request = vfio_pci_core_request,
	.match = vfio_pci_core_match,
#if IS_ENABLED(CONFIG_IOMMUFD)
	.bind_iommufd = vfio_iommufd_physical_bind,
	.unbind_iommufd = vfio_iommufd_physical_unbind,
	.attach_ioas = vfio_iommufd_physical_attach_ioas,
	.detach_ioas = vfio_iommufd_physical_detach_ioas,
#endif
};

/* ------------------------------------------------------------------------ */
/* sysfs                                                                     */

/*
 * Numeric knobs: parsed, range-checked, then written under the state mutex. idle_only
 * knobs shape the migration stream or the flags the core reads at every ioctl, so they
 * are refused (EBUSY) while the device fd is open. READ_ONCE/WRITE_ONCE because the VFIO
 * core reads migration_flags without our mutex.
 */
#define EDU_ATTR_NUM(name, field, type, fmt, min, max, idle_only)		\
static ssize_t name##_show(struct device *dev, struct device_attribute *attr,	\
			   char *buf)						\
{										\
	struct edu_dev *e = edu_from_dev(dev);					\
	type v;									\
										\
	mutex_lock(&e->state_mutex);						\
	v = READ_ONCE(e->field);						\
	edu_state_unlock(e);							\
	return sysfs_emit(buf, fmt "\n", v);					\
}										\
static ssize_t name##_store(struct device *dev, struct device_attribute *attr,	\
			    const char *buf, size_t count)			\
{										\
	struct edu_dev *e = edu_from_dev(dev);					\
	unsigned long long v;							\
	int ret = kstrtoull(buf, 0, &v);					\
										\
	if (ret)								\
		return ret;							\
	if (v < (min) || v > (max))						\
		return -EINVAL;							\
	mutex_lock(&e->state_mutex);						\
	if ((idle_only) && e->opened)						\
		ret = -EBUSY;							\
	else									\
		WRITE_ONCE(e->field, (type)v);					\
	edu_state_unlock(e);							\
	return ret ? ret : count;						\
}										\
static DEVICE_ATTR_RW(name)

/* Two-word knobs backed by a bool: `off_word` stores false, `on_word` true. */
#define EDU_ATTR_CHOICE(name, field, off_word, on_word)				\
static ssize_t name##_show(struct device *dev, struct device_attribute *attr,	\
			   char *buf)						\
{										\
	struct edu_dev *e = edu_from_dev(dev);					\
										\
	return sysfs_emit(buf, "%s\n", READ_ONCE(e->field) ? on_word : off_word);	\
}										\
static ssize_t name##_store(struct device *dev, struct device_attribute *attr,	\
			    const char *buf, size_t count)			\
{										\
	struct edu_dev *e = edu_from_dev(dev);					\
	bool v;									\
										\
	if (sysfs_streq(buf, off_word))						\
		v = false;							\
	else if (sysfs_streq(buf, on_word))					\
		v = true;							\
	else									\
		return -EINVAL;							\
	mutex_lock(&e->state_mutex);						\
	e->field = v;								\
	edu_state_unlock(e);							\
	return count;								\
}										\
static DEVICE_ATTR_RW(name)

EDU_ATTR_NUM(flags, core.vdev.migration_flags, u32, "%u", 0, U32_MAX, true);
EDU_ATTR_NUM(arc_delay_us, arc_delay_us, u32, "%u", 0, EDU_MAX_ARC_DELAY_US, false);


static int edu_parse_state(const char *s, int *out)
{
	unsigned int i;

	if (!strcmp(s, "*")) {
		*out = -1;
		return 0;
	}
	for (i = 0; i < EDU_NR_STATES; i++) {
		if (!strcmp(s, edu_state_names[i])) {
			*out = i;
			return 0;
		}
	}
	return -EINVAL;
}

static ssize_t fail_arc_show(struct device *dev, struct device_attribute *attr,
			     char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	ssize_t n;

	mutex_lock(&e->state_mutex);
	if (!e->fail_armed)
		n = sysfs_emit(buf, "none\n");
	else
		n = sysfs_emit(buf, "%s>%s\n",
			       e->fail_from < 0 ? "*" : edu_state_name(e->fail_from),
			       e->fail_to < 0 ? "*" : edu_state_name(e->fail_to));
	edu_state_unlock(e);
	return n;
}

static ssize_t fail_arc_store(struct device *dev, struct device_attribute *attr,
			      const char *buf, size_t count)
{
	struct edu_dev *e = edu_from_dev(dev);
	char tmp[64], *s, *gt;
	int from = -1, to = -1;
	bool arm;

	if (count >= sizeof(tmp))
		return -EINVAL;
	memcpy(tmp, buf, count);
	tmp[count] = '\0';
	s = strim(tmp);
	arm = *s && strcmp(s, "none");
	if (arm) {
		gt = strchr(s, '>');
		if (!gt)
			return -EINVAL;
		*gt = '\0';
		if (edu_parse_state(strim(s), &from) ||
		    edu_parse_state(strim(gt + 1), &to))
			return -EINVAL;
	}
	mutex_lock(&e->state_mutex);
	e->fail_armed = arm;
	e->fail_from = from;
	e->fail_to = to;
	e->fail_count = 0;
	edu_state_unlock(e);
	return count;
}
static DEVICE_ATTR_RW(fail_arc);

EDU_ATTR_NUM(fail_errno, fail_errno, int, "%d", 1, MAX_ERRNO, false);
EDU_ATTR_CHOICE(fail_mode, fail_always, "once", "always");
EDU_ATTR_CHOICE(fail_outcome, fail_to_error, "stay", "error");

static ssize_t fail_count_show(struct device *dev, struct device_attribute *attr,
			       char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	u64 v;

	mutex_lock(&e->state_mutex);
	v = e->fail_count;
	edu_state_unlock(e);
	return sysfs_emit(buf, "%llu\n", v);
}
static DEVICE_ATTR_RO(fail_count);

EDU_ATTR_NUM(blob_size, blob_size, u64, "%llu", 0, EDU_MAX_BLOB, true);
EDU_ATTR_NUM(seed, seed, u64, "0x%016llx", 0, U64_MAX, true);

/* FNV-1a 64 over: le64 seed, le64 blob_size, le32 live, le32 fact, le32 status, le32 0 */
static u64 edu_digest(u64 seed, u64 blob_size, const struct edu_regs *r)
{
	u8 b[32];
	u64 h = 0xcbf29ce484222325ULL;
	unsigned int i;

	put_unaligned_le64(seed, b);
	put_unaligned_le64(blob_size, b + 8);
	put_unaligned_le32(r->live, b + 16);
	put_unaligned_le32(r->fact, b + 20);
	put_unaligned_le32(r->status, b + 24);
	put_unaligned_le32(0, b + 28);
	for (i = 0; i < sizeof(b); i++) {
		h ^= b[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static ssize_t state_digest_show(struct device *dev,
				 struct device_attribute *attr, char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	struct edu_regs r;
	u64 h;

	mutex_lock(&e->state_mutex);
	edu_sample_regs(e, &r);
	h = edu_digest(e->seed, e->blob_size, &r);
	edu_state_unlock(e);
	return sysfs_emit(buf, "%016llx\n", h);
}
static DEVICE_ATTR_RO(state_digest);

static ssize_t regs_show(struct device *dev, struct device_attribute *attr,
			 char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	struct edu_regs r;

	mutex_lock(&e->state_mutex);
	edu_sample_regs(e, &r);
	edu_state_unlock(e);
	return sysfs_emit(buf, "live=0x%08x fact=0x%08x status=0x%02x\n",
			  r.live, r.fact, r.status);
}
static DEVICE_ATTR_RO(regs);

static ssize_t dirty_inject_store(struct device *dev,
				  struct device_attribute *attr,
				  const char *buf, size_t count)
{
	struct edu_dev *e = edu_from_dev(dev);
	unsigned long long v;
	int ret = kstrtoull(buf, 0, &v);

	if (ret)
		return ret;
	if (v < EDU_MIN_DIRTY || v > EDU_MAX_DIRTY)
		return -EINVAL;
	mutex_lock(&e->state_mutex);
	if (!e->saving || e->saving->final ||
	    (e->mig_state != EDU_ST(PRE_COPY) && e->mig_state != EDU_ST(PRE_COPY_P2P)))
		ret = -ENOTCONN;
	else if (e->saving->pending_dirt + v > EDU_MAX_DIRTY)
		ret = -ENOSPC;
	else
		e->saving->pending_dirt += v;
	edu_state_unlock(e);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(dirty_inject);

static ssize_t arcs_show(struct device *dev, struct device_attribute *attr,
			 char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	u64 v;

	mutex_lock(&e->state_mutex);
	v = e->arcs;
	edu_state_unlock(e);
	return sysfs_emit(buf, "%llu\n", v);
}
static DEVICE_ATTR_RO(arcs);

static ssize_t arc_log_show(struct device *dev, struct device_attribute *attr,
			    char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	unsigned int i, idx;
	int n = 0;

	mutex_lock(&e->state_mutex);
	idx = (e->log_head + EDU_ARC_LOG_LEN - e->log_cnt) % EDU_ARC_LOG_LEN;
	for (i = 0; i < e->log_cnt; i++) {
		struct edu_arc *a = &e->log[(idx + i) % EDU_ARC_LOG_LEN];

		n += sysfs_emit_at(buf, n, "%s>%s %d\n", edu_state_name(a->from),
				   edu_state_name(a->to), a->rc);
	}
	edu_state_unlock(e);
	return n;
}

static ssize_t arc_log_store(struct device *dev, struct device_attribute *attr,
			     const char *buf, size_t count)
{
	struct edu_dev *e = edu_from_dev(dev);

	mutex_lock(&e->state_mutex);
	e->log_head = 0;
	e->log_cnt = 0;
	edu_state_unlock(e);
	return count;
}
static DEVICE_ATTR_RW(arc_log);

static ssize_t mig_state_show(struct device *dev, struct device_attribute *attr,
			      char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	u32 s;

	mutex_lock(&e->state_mutex);
	s = e->mig_state;
	edu_state_unlock(e);
	return sysfs_emit(buf, "%s\n", edu_state_name(s));
}
static DEVICE_ATTR_RO(mig_state);

static ssize_t dma_logging_show(struct device *dev,
				struct device_attribute *attr, char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);

	return sysfs_emit(buf, "%d\n", e->core.vdev.log_ops ? 1 : 0);
}
static DEVICE_ATTR_RO(dma_logging);

static ssize_t last_error_show(struct device *dev,
			       struct device_attribute *attr, char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	ssize_t n;

	mutex_lock(&e->state_mutex);
	n = sysfs_emit(buf, "%s\n", e->last_error[0] ? e->last_error : "none");
	edu_state_unlock(e);
	return n;
}
static DEVICE_ATTR_RO(last_error);

static ssize_t compat_show(struct device *dev, struct device_attribute *attr,
			   char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	ssize_t n;

	mutex_lock(&e->state_mutex);
	n = sysfs_emit(buf, "%s\n", e->compat);
	edu_state_unlock(e);
	return n;
}

static ssize_t compat_store(struct device *dev, struct device_attribute *attr,
			    const char *buf, size_t count)
{
	struct edu_dev *e = edu_from_dev(dev);
	size_t len = count;

	if (len && buf[len - 1] == '\n')
		len--;
	if (!edu_compat_valid(buf, len))
		return -EINVAL;
	mutex_lock(&e->state_mutex);
	memcpy(e->compat, buf, len);
	e->compat[len] = '\0';
	edu_state_unlock(e);
	return count;
}
static DEVICE_ATTR_RW(compat);

static struct attribute *edu_mig_attrs[] = {
	&dev_attr_flags.attr,
	&dev_attr_arc_delay_us.attr,
	&dev_attr_fail_arc.attr,
	&dev_attr_fail_errno.attr,
	&dev_attr_fail_mode.attr,
	&dev_attr_fail_outcome.attr,
	&dev_attr_fail_count.attr,
	&dev_attr_blob_size.attr,
	&dev_attr_seed.attr,
	&dev_attr_state_digest.attr,
	&dev_attr_regs.attr,
	&dev_attr_dirty_inject.attr,
	&dev_attr_arcs.attr,
	&dev_attr_arc_log.attr,
	&dev_attr_mig_state.attr,
	&dev_attr_dma_logging.attr,
	&dev_attr_last_error.attr,
	&dev_attr_compat.attr,
	NULL,
};

static const struct attribute_group edu_mig_group = {
	.name = "edu_mig",
	.attrs = edu_mig_attrs,
};

/* 2020 mdev "migration_version" proposal: "<driver>-<version>:<compat>" */
static ssize_t migration_version_show(struct device *dev,
				      struct device_attribute *attr, char *buf)
{
	struct edu_dev *e = edu_from_dev(dev);
	ssize_t n;

	mutex_lock(&e->state_mutex);
	n = sysfs_emit(buf, EDU_MIGVER_PREFIX "%d:%s\n", EDU_MIGVER_VERSION,
		       e->compat);
	edu_state_unlock(e);
	return n;
}

static ssize_t migration_version_store(struct device *dev,
				       struct device_attribute *attr,
				       const char *buf, size_t count)
{
	struct edu_dev *e = edu_from_dev(dev);
	const char *p = buf, *colon, *compat;
	size_t len = count, plen = strlen(EDU_MIGVER_PREFIX), clen;
	unsigned int ver = 0, digits = 0;
	int ret = 0;

	if (len && buf[len - 1] == '\n')
		len--;
	if (len < plen || memcmp(p, EDU_MIGVER_PREFIX, plen))
		return -EINVAL;		/* other driver or malformed */
	p += plen;
	len -= plen;
	colon = memchr(p, ':', len);
	if (!colon || colon == p)
		return -EINVAL;
	for (; p < colon; p++) {
		if (!isdigit(*p) || ++digits > 9)
			return -EINVAL;
		ver = ver * 10 + (*p - '0');
	}
	compat = colon + 1;
	clen = len - (compat - (buf + plen));
	if (!edu_compat_valid(compat, clen))
		return -EINVAL;
	if (ver != EDU_MIGVER_VERSION)
		return -EINVAL;
	mutex_lock(&e->state_mutex);
	if (strlen(e->compat) != clen || memcmp(e->compat, compat, clen))
		ret = -EINVAL;
	edu_state_unlock(e);
	return ret ? ret : count;
}
static DEVICE_ATTR_RW(migration_version);

static struct attribute *edu_top_attrs[] = {
	&dev_attr_migration_version.attr,
	NULL,
};

static const struct attribute_group edu_top_group = {
	.attrs = edu_top_attrs,
};

static const struct attribute_group *edu_dev_groups[] = {
	&edu_mig_group,
	&edu_top_group,
	NULL,
};

/* ------------------------------------------------------------------------ */
/* PCI driver                                                                */

static int edu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct edu_dev *e;
	unsigned int flags;
	int ret;

	e = vfio_alloc_device(edu_dev, core.vdev, &pdev->dev, &edu_vfio_ops);
	if (IS_ERR(e))
		return PTR_ERR(e);

	kernel_param_lock(THIS_MODULE);
	flags = param_flags;
	e->blob_size = param_blob_size;
	e->seed = param_seed;
	e->arc_delay_us = param_arc_delay_us;
	strscpy(e->compat, param_compat, sizeof(e->compat));
	if (param_dma_logging)
		e->core.vdev.log_ops = &edu_log_ops;
	kernel_param_unlock(THIS_MODULE);

	if (!e->seed)
		e->seed = edu_mix64(0x6564752d76666970ULL ^
				    ((u64)pci_domain_nr(pdev->bus) << 16 |
				     pci_dev_id(pdev)));
	e->fail_from = -1;
	e->fail_to = -1;
	e->fail_errno = EIO;

	/* the core insists on STOP_COPY at registration; set the real value after */
	e->core.vdev.migration_flags = flags | VFIO_MIGRATION_STOP_COPY;
	e->core.vdev.mig_ops = &edu_mig_ops;

	dev_set_drvdata(&pdev->dev, &e->core);
	ret = vfio_pci_core_register_device(&e->core);
	if (ret)
		goto out_put;
	WRITE_ONCE(e->core.vdev.migration_flags, flags);
	return 0;

out_put:
	vfio_put_device(&e->core.vdev);
	return ret;
}

static void edu_remove(struct pci_dev *pdev)
{
	struct edu_dev *e = edu_from_dev(&pdev->dev);

	vfio_pci_core_unregister_device(&e->core);
	vfio_put_device(&e->core.vdev);
}

static const struct pci_device_id edu_ids[] = {
	{ PCI_DRIVER_OVERRIDE_DEVICE_VFIO(0x1234, 0x11e8) },
	{}
};
MODULE_DEVICE_TABLE(pci, edu_ids);

static const struct pci_error_handlers edu_err_handlers = {
	.error_detected = vfio_pci_core_aer_err_detected,
	.reset_done = edu_reset_done,
};

static struct pci_driver edu_driver = {
	.name = EDU_DRIVER_NAME,
	.id_table = edu_ids,
	.probe = edu_probe,
	.remove = edu_remove,
	.err_handler = &edu_err_handlers,
	.dev_groups = edu_dev_groups,
	.driver_managed_dma = true,
};
module_pci_driver(edu_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Test vfio-pci variant driver with VFIO migration v2 for QEMU's edu device");
