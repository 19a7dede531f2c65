// `vfio-mig qualify` against the real kernel: edu and mtty pairs pass; an edu device
// with an injected fault fails, naming the arc.
import test from 'ava';
import { runCli } from '../cli-harness.ts';
import { requireRig, prepareEdu, prepareMtty, eduKnob, eduInject } from './guest.ts';

requireRig(test);
const inRig = Boolean(process.env.VFIO_MIG_IN_RIG);
const edu = inRig ? prepareEdu() : [];
const mtty = inRig ? prepareMtty(2) : [];

async function qualify(...ids: string[]): Promise<{ code: number; out: string }> {
  const r = await runCli(['qualify', ...ids]);
  return { code: r.code, out: r.out + r.err };
}

test.serial('an edu pair qualifies', async (t) => {
  const r = await qualify(edu[0]!, edu[1]!);
  t.log(r.out.split('\n').filter((l) => /verdict|MIG_DATA_SIZE|RESET|state /.test(l)).join('\n'));
  t.is(r.code, 0, r.out);
  t.regex(r.out, /verdict: PASS - 0000:\S+ behaves as the VFIO migration uAPI requires/);
  t.regex(r.out, /PRE_COPY_P2P->STOP_COPY\s+\S+ ms\s+ok/);
});

test.serial('an mtty pair qualifies', async (t) => {
  const r = await qualify(mtty[0]!, mtty[1]!);
  t.is(r.code, 0, r.out);
  t.regex(r.out, /refuse ERROR\s+\S+ ms\s+ok/);
});

test.serial('an edu device with an injected fault fails, naming the arc', async (t) => {
  const id = edu[2] ?? edu[0]!;
  eduInject(id, 'STOP>RESUMING', { mode: 'always', outcome: 'stay' });
  try {
    const r = await qualify(id);
    t.is(r.code, 1, r.out);
    t.regex(r.out, /STOP->RESUMING\s+\S+ ms\s+FAIL EIO at STOP->RESUMING/);
    t.regex(r.out, /verdict: FAIL - .*STOP->RESUMING/);
  } finally {
    eduKnob(id, 'fail_arc', 'none');
  }
});
