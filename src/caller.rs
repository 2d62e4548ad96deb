//! Who asked. Public functions that act for their caller (queue a job, make
//! a schedule, subscribe, ...) must know the role that called them, and the
//! only trustworthy answer is the current user at the moment of the call:
//! inside a SECURITY DEFINER function that is its owner, inside a
//! subscription condition the subscriber, inside a job the job's role.
//! `GetOuterUserId()` is not it: a definer function called by another role
//! would act for that other role.
//!
//! So those functions are declared `LANGUAGE c` with the symbol
//! `ihub_for_caller`. A C function is never SECURITY DEFINER: it reads the
//! current user and calls the internal SECURITY DEFINER function
//! `ihub._<name>_by(<same arguments>, caller regrole)` directly through the
//! function manager, which does not check EXECUTE: nobody but the extension
//! owner holds EXECUTE on the `_by` functions, so the caller cannot be forged.

use pgrx::prelude::*;

#[no_mangle]
pub extern "C" fn pg_finfo_ihub_for_caller() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// # Safety
/// Called by the function manager with a valid `fcinfo`.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn ihub_for_caller(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let flinfo = (*fcinfo).flinfo;
    if (*flinfo).fn_extra.is_null() {
        (*flinfo).fn_extra = lookup_target((*flinfo).fn_oid, (*flinfo).fn_mcxt).cast();
    }
    let target = (*flinfo).fn_extra as *mut pg_sys::FmgrInfo;
    let nargs = (*fcinfo).nargs as usize;
    let args = (*fcinfo).args.as_slice(nargs);
    let caller = pg_sys::NullableDatum { value: pg_sys::Datum::from(pg_sys::GetUserId()), isnull: false };
    let (value, isnull) = call_with(target, (*fcinfo).fncollation, args.iter().copied().chain([caller]));
    (*fcinfo).isnull = isnull;
    value
}

/// Calls a function through the function manager with these arguments.
unsafe fn call_with(
    target: *mut pg_sys::FmgrInfo,
    collation: pg_sys::Oid,
    args: impl Iterator<Item = pg_sys::NullableDatum>,
) -> (pg_sys::Datum, bool) {
    let args: Vec<_> = args.collect();
    let size = std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>()
        + std::mem::size_of::<pg_sys::NullableDatum>() * args.len();
    let call = pg_sys::palloc0(size) as pg_sys::FunctionCallInfo;
    (*call).flinfo = target;
    (*call).nargs = args.len() as i16;
    (*call).fncollation = collation;
    (*call).args.as_mut_slice(args.len()).copy_from_slice(&args);
    let value = ((*target).fn_addr.expect("a callable function"))(call);
    (value, (*call).isnull)
}

/// The `_<name>_by` function of a `LANGUAGE c` entry point, ready to call.
unsafe fn lookup_target(entry: pg_sys::Oid, mcxt: pg_sys::MemoryContext) -> *mut pg_sys::FmgrInfo {
    let name = std::ffi::CStr::from_ptr(pg_sys::get_func_name(entry)).to_string_lossy().into_owned();
    let (mut types, mut nargs) = (std::ptr::null_mut(), 0);
    pg_sys::get_func_signature(entry, &mut types, &mut nargs);
    let mut arg_types = std::slice::from_raw_parts(types, nargs as usize).to_vec();
    arg_types.push(pg_sys::REGROLEOID);
    let info = pg_sys::MemoryContextAllocZero(mcxt, std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
    pg_sys::fmgr_info_cxt(ihub_function(&format!("_{name}_by"), &arg_types), info, mcxt);
    info
}

/// The function `ihub.<name>(<arg_types>)`; an error if there is none.
unsafe fn ihub_function(name: &str, arg_types: &[pg_sys::Oid]) -> pg_sys::Oid {
    let name = std::ffi::CString::new(name).expect("no NUL");
    let qualified = pg_sys::lappend(
        pg_sys::lappend(std::ptr::null_mut(), pg_sys::makeString(pg_sys::pstrdup(c"ihub".as_ptr())).cast()),
        pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast(),
    );
    pg_sys::LookupFuncName(qualified, arg_types.len() as i32, arg_types.as_ptr(), false)
}

/// Calls the internal function `ihub.<name>(args)` with the extension
/// owner's rights (it is SECURITY DEFINER; EXECUTE is not checked here).
/// For Rust entry points that are not SECURITY DEFINER themselves.
pub fn call_internal(name: &str, arg_types: &[pg_sys::Oid], args: &[Option<pg_sys::Datum>]) -> Option<pg_sys::Datum> {
    unsafe {
        let info = pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
        pg_sys::fmgr_info(ihub_function(name, arg_types), info);
        let args = args
            .iter()
            .map(|a| pg_sys::NullableDatum { value: a.unwrap_or(pg_sys::Datum::from(0)), isnull: a.is_none() });
        let (value, isnull) = call_with(info, pg_sys::DEFAULT_COLLATION_OID, args);
        (!isnull).then_some(value)
    }
}
